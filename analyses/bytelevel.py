"""Exact next-byte probabilities of tokenised LMs, to compare models across vocabularies per byte.

Phan et al., "Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and
Model Ensembles" (arXiv 2410.09303; code: facebookresearch/Exact-Byte-Level-Probabilities-
from-Tokenized-LMs). Their Byte-Token Representation Lemma: the probability that a text starts
with the n bytes x is a sum over the cover encodings of x, a disjoint union,

    P(x...) = sum_{t in cover(x)} P(t_1 .. t_k),
    cover(x) = {t : bytes(t_1 .. t_{k-1}) is a prefix of x shorter than n, x a prefix of bytes(t)},

and P(next byte = b | x) = P(x b...) / P(x...).

Variants (`prune`):
- "none": every cover; exact for the model as a distribution over token sequences, but
  exponentially many (tests and short prefixes only).
- "prefix" (default): t_{<k} = encode(bytes(t_{<k})), the tokenizer's own encoding, so one
  left part per split of x; the last token is any.
- "canonical": all of t is the tokenizer's own encoding, t = encode(bytes(t)): what the
  authors' code keeps (left parts from `encode_str`, then `_cover_enc_check` on the whole
  cover and `isvalid` on the token after the context). One tokenizer call per candidate last
  token: seconds a position (`benchmarks/bytelevel_figures.py`).
BPE's canonical encodings are closed under prefixes, so canonical <= prefix <= none, all
holding the tokenizer's encoding of x. "prefix" is the default: the closest to the exact
marginal that stays tractable (one forward per split, no tokenizer call per candidate; after
an exact encoding it is the model's own next-token distribution grouped by first byte). The
pruned variants drop the mass of pruned sequences, so next-byte distributions are renormalised
over the 256 bytes by default, as the authors do. Special tokens (BOS, EOS, unused) have no
bytes: their mass after an exact encoding is the text ending, which normalisation removes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe.analyses.byte_vocab import (ByteVocab, _tokenizations,  # noqa: F401 (token_bytes)
                                            byte_vocab, encode_bytes, leading_ids, token_bytes)
from tokenprobe.placement import input_device
from tokenprobe.tokens import pad_batch

Prune = Literal["prefix", "canonical", "none"]
PRUNES = ("prefix", "canonical", "none")
WHITESPACE = b" \t\n\r\x0b\x0c"


@dataclass(frozen=True)
class _Group:
    """Cover encodings sharing their left tokens: left + (u,) for u = ids of `rows`."""
    left: tuple[int, ...]  # all tokens but the last; their bytes are prefix[:split]
    split: int
    rows: np.ndarray  # (R,) rows of the ByteVocab: the possible last tokens


def _canonical(tokenizer: PreTrainedTokenizerBase, vocab: ByteVocab, head: bytes,
               left: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """(R,) bool: left + (u,) is the tokenizer's encoding of head + bytes(u), u the token of
    each row, in one batched tokenizer call. A candidate ending inside a UTF-8 character
    cannot be encoded and is kept."""
    texts = {}
    for k, row in enumerate(rows):
        try:
            texts[k] = (head + vocab.keys[row]).decode("utf-8")
        except UnicodeDecodeError:
            pass
    keep = np.ones(len(rows), dtype=bool)
    encoded = tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] \
        if texts else []
    for k, ids in zip(texts, encoded):
        keep[k] = tuple(ids) == left + (int(vocab.ids[rows[k]]),)
    return keep


def _cover_groups(prefix: bytes, tokenizer: PreTrainedTokenizerBase, vocab: ByteVocab,
                  prune: Prune, *, longer: bool = False) -> list[_Group]:
    """The cover encodings of `prefix` as groups; with `longer`, those of prefix + any byte
    (splits up to len(prefix), last tokens strictly longer than the rest of the prefix)."""
    if prune not in PRUNES:
        raise ValueError(f"unknown prune {prune!r}; expected one of {PRUNES}")
    n, groups = len(prefix), []
    for split in range(max(0, n - vocab.max_len), n + longer):
        rows = vocab.rows(prefix[split:], longer=longer)
        if not len(rows):
            continue
        lefts = (_tokenizations(prefix[:split], vocab) if prune == "none"
                 else [encode_bytes(tokenizer, vocab, prefix[:split])])
        for left in filter(lambda lf: lf is not None, lefts):
            kept = rows[_canonical(tokenizer, vocab, prefix[:split], left, rows)] \
                if prune == "canonical" else rows
            groups.append(_Group(left, split, kept))
    return groups


def cover_encodings(prefix: bytes, tokenizer: PreTrainedTokenizerBase, *,
                    prune: Prune = "prefix", vocab: ByteVocab | None = None
                    ) -> list[tuple[int, ...]]:
    """The cover encodings of `prefix` (module docstring): token sequences t whose bytes start
    with `prefix` while bytes(t[:-1]) is a shorter prefix of it, pruned as `prune` says
    ("prefix", the default: t[:-1] is the tokenizer's encoding of its bytes; "canonical", the
    authors' rule: all of t is; "none": all covers). Empty for an empty prefix."""
    vocab = vocab or byte_vocab(tokenizer)
    return [g.left + (int(vocab.ids[r]),) for g in _cover_groups(prefix, tokenizer, vocab, prune)
            for r in g.rows]


class _Scorer:
    """log P(left | start) and log P(next token | start + left) (V,) for one model: batched,
    cached by token sequence; a left that prefixes another is read off that one's forward."""

    def __init__(self, model: PreTrainedModel, start: Sequence[int], *, budget: int = 2**26):
        if not start:
            raise ValueError("the model needs at least one token to condition on: its tokenizer "
                             "adds no BOS, so pass start_ids (e.g. the ids of a preceding text)")
        self.model, self.start, self.budget = model, tuple(start), budget
        self.cache: dict[tuple[int, ...], tuple[float, torch.Tensor]] = {}

    def ensure(self, lefts: Sequence[tuple[int, ...]]) -> None:
        todo = sorted({lf for lf in lefts if lf not in self.cache}, key=len, reverse=True)
        reads: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        hosts: dict[tuple[int, ...], tuple[int, ...]] = {}  # prefix of a run -> the run
        for left in todo:  # longest first: a left is a run or a prefix of an earlier run
            if left not in hosts:
                hosts |= {left[:j]: left for j in range(len(left) + 1) if left[:j] not in hosts}
            reads.setdefault(hosts[left], []).append(left)
        runs = list(reads)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        while runs:
            width = len(self.start) + len(runs[0])  # longest first
            take = max(1, self.budget // (vocab_size * width))
            self._forward(runs[:take], reads)
            runs = runs[take:]

    @torch.inference_mode()
    def _forward(self, runs: list[tuple[int, ...]], reads: dict) -> None:
        s = len(self.start)
        ids, mask = pad_batch([list(self.start + r) for r in runs], self.start[0],
                              input_device(self.model))
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for b, run in enumerate(runs):
            logp = logits[b, :s + len(run)].double().log_softmax(-1)  # (T, V)
            steps = logp[s - 1:-1].gather(1, ids[b, s:s + len(run), None])[:, 0]
            cum = torch.cat([steps.new_zeros(1), steps.cumsum(0)]).cpu()  # (len(run) + 1,)
            for left in reads[run]:  # clone: a view would keep all of (T, V) alive
                self.cache[left] = (float(cum[len(left)]), logp[s - 1 + len(left)].cpu().clone())


class _ByteModel:
    """A tokenised model read as a model over bytes after its start ids."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 prune: Prune, start_ids: Sequence[int] | None, vocab: ByteVocab | None):
        self.tokenizer, self.prune = tokenizer, prune
        self.vocab = vocab or byte_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
        start = leading_ids(tokenizer) if start_ids is None else start_ids
        self.scorer = _Scorer(model, start)

    def _logprobs(self, groups: list[_Group]) -> list[torch.Tensor]:
        """log P(left + (u,)) for each group's rows, float64."""
        self.scorer.ensure([g.left for g in groups])
        out = []
        for g in groups:
            left_lp, next_lp = self.scorer.cache[g.left]
            out.append(left_lp + next_lp[torch.from_numpy(self.vocab.ids[g.rows])])
        return out

    def prefix_logprob(self, prefix: bytes) -> float:
        if not prefix:
            return 0.0
        values = self._logprobs(_cover_groups(prefix, self.tokenizer, self.vocab, self.prune))
        return float(torch.logsumexp(torch.cat(values), 0)) if values else float("-inf")

    def next_byte(self, prefixes: Sequence[bytes], *, normalize: bool = True) -> torch.Tensor:
        """(P, 256) float64: log P(next byte | prefix) for each prefix."""
        groups = [_cover_groups(x, self.tokenizer, self.vocab, self.prune, longer=True)
                  for x in prefixes]
        self.scorer.ensure([g.left for gs in groups for g in gs])  # one batched pass
        out = torch.full((len(prefixes), 256), float("-inf"), dtype=torch.float64)
        for p, (x, gs) in enumerate(zip(prefixes, groups)):
            if not gs:
                continue
            values = torch.cat(self._logprobs(gs))
            nxt = torch.from_numpy(np.concatenate(
                [self.vocab.table[g.rows, len(x) - g.split] for g in gs]).astype(np.int64))
            top = values.max()
            mass = torch.zeros(256, dtype=torch.float64).index_add_(0, nxt, (values - top).exp())
            logp = mass.log() + top  # log P(x b ...)
            out[p] = logp - (torch.logsumexp(logp, 0) if normalize else self.prefix_logprob(x))
        return out


def prefix_logprob(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prefix: bytes,
                   *, prune: Prune = "prefix", start_ids: Sequence[int] | None = None,
                   vocab: ByteVocab | None = None) -> float:
    """log P(the text starts with the bytes `prefix` | start_ids), summed over its cover
    encodings (module docstring; 0.0 for an empty prefix).

    Args:
        prune: "prefix" (default), "canonical" (the authors' rule) or "none" (exponential).
        start_ids: the ids the text follows; default the tokenizer's own (`leading_ids`:
            <bos> for Gemma 3). SmolLM2 adds none, so it needs them (e.g. a preceding text).
        vocab: a prebuilt `byte_vocab(tokenizer, V)` to reuse.
    """
    return _ByteModel(model, tokenizer, prune=prune, start_ids=start_ids,
                      vocab=vocab).prefix_logprob(prefix)


def next_byte_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prefix: bytes, *, prune: Prune = "prefix", normalize: bool = True,
                       start_ids: Sequence[int] | None = None,
                       vocab: ByteVocab | None = None) -> torch.Tensor:
    """(256,) float64: log P(next byte = b | the text starts with `prefix`), -inf where no
    cover reaches b. With `normalize` (default, as the authors) renormalised over the 256
    bytes, i.e. given that a byte follows; without, exactly log P(prefix b) - log P(prefix),
    which sums to less than 1 by the mass of special tokens (EOS...) after an exact encoding
    and, when pruned, of the pruned continuations. Other arguments: `prefix_logprob`."""
    lm = _ByteModel(model, tokenizer, prune=prune, start_ids=start_ids, vocab=vocab)
    return lm.next_byte([prefix], normalize=normalize)[0]


def word_starts(data: bytes) -> list[int]:
    """Byte offsets where a whitespace-separated word begins: 0 and each non-whitespace byte
    after a whitespace byte."""
    return [0] + [n for n in range(1, len(data))
                  if data[n - 1] in WHITESPACE and data[n] not in WHITESPACE]


def _offsets(data: bytes, positions: str | Sequence[int]) -> list[int]:
    if isinstance(positions, str):
        if positions not in ("word_starts", "all"):
            raise ValueError(f"unknown positions {positions!r}; expected 'word_starts', 'all' "
                             "or a list of byte offsets")
        return word_starts(data) if positions == "word_starts" else list(range(len(data)))
    if any(not 0 <= int(n) < len(data) for n in positions):
        raise ValueError(f"byte offsets must lie in [0, {len(data)})")
    return [int(n) for n in positions]


def _text_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: bytes,
                   offsets: list[int], prune: Prune) -> torch.Tensor:
    """(P, 256) normalised next-byte log-probs at `offsets` of the text `data`: after the
    tokenizer's BOS; without one (SmolLM2), given the encoding of the first word, as the
    authors condition on the text before the last space, and NaN before that space."""
    vocab = byte_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
    start, skip = leading_ids(tokenizer), 0
    if not start:
        skip = next((n for n in range(1, len(data)) if data[n] in WHITESPACE), len(data))
        start = list(encode_bytes(tokenizer, vocab, data[:skip]) or ())
    out = torch.full((len(offsets), 256), float("nan"), dtype=torch.float64)
    live = [k for k, n in enumerate(offsets) if n >= skip]
    if start and live:
        lm = _ByteModel(model, tokenizer, prune=prune, start_ids=start, vocab=vocab)
        out[live] = lm.next_byte([data[skip:offsets[k]] for k in live])
    return out


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """(P,) KL(p || q) in nats over the last dim (terms with p = 0 are 0; inf where q = 0 < p)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """(P,) entropy in nats over the last dim."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)


def byte_divergence(model_a: PreTrainedModel, tok_a: PreTrainedTokenizerBase,
                    model_b: PreTrainedModel, tok_b: PreTrainedTokenizerBase, text: str, *,
                    positions: str | Sequence[int] = "word_starts",
                    prune: Prune = "prefix") -> pd.DataFrame:
    """Two models' next-byte distributions compared at byte offsets of `text`, whatever
    their vocabularies (`next_byte_logprobs`, normalised).

    A model whose tokenizer adds no BOS (SmolLM2) has no distribution over its first token:
    it is conditioned on the encoding of the first word, and its columns are NaN before the
    first space. SmolLM2 has no token starting with 21 of the 256 bytes (0xC0, 0xF5-0xFF...):
    KL towards it is inf wherever the other model gives them mass.

    Args:
        positions: "word_starts" (`word_starts`), "all", or a list of byte offsets.
        prune: the cover variant, as in `prefix_logprob`.

    Returns:
        One row per offset n, the distribution of byte n given bytes :n: `byte_offset`,
        `char_offset` (the character byte n belongs to), `next_byte` (its value, 0-255),
        `logp_a`, `logp_b` (log-prob of that byte), `entropy_a`, `entropy_b`, `kl_ab`
        (KL(a || b)), `kl_ba`, `jsd` (Jensen-Shannon, at most ln 2), all in nats.
    """
    data = text.encode("utf-8")
    offsets = _offsets(data, positions)
    la, lb = (_text_logprobs(m, t, data, offsets, prune) for m, t in
              ((model_a, tok_a), (model_b, tok_b)))  # (P, 256) each
    bad_a, bad_b = la.isnan().any(-1), lb.isnan().any(-1)
    mix = torch.logaddexp(la, lb) - math.log(2.0)  # (P, 256) log of (p_a + p_b) / 2
    nxt = torch.tensor([data[n] for n in offsets], dtype=torch.long)[:, None]  # (P, 1)
    chars = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
    columns = {"logp_a": (la.gather(1, nxt)[:, 0], bad_a),
               "logp_b": (lb.gather(1, nxt)[:, 0], bad_b),
               "entropy_a": (_entropy(la), bad_a), "entropy_b": (_entropy(lb), bad_b),
               "kl_ab": (_kl(la, lb), bad_a | bad_b), "kl_ba": (_kl(lb, la), bad_a | bad_b),
               "jsd": (0.5 * (_kl(la, mix) + _kl(lb, mix)), bad_a | bad_b)}
    return pd.DataFrame({"byte_offset": offsets, "char_offset": chars[offsets].tolist(),
                         "next_byte": nxt[:, 0].tolist(),
                         **{k: torch.where(m, float("nan"), v).numpy()
                            for k, (v, m) in columns.items()}})
