"""Bigram-Backcopy data (Guo et al.): the task's statistics, its sampler, its character tokenizer.

Two sources of statistics, each with its own token ids:
- tokenprobe's (`BigramTask.from_text`, on `tokenprobe/data/toy_text.txt` by default): `<bos>`
  = 0, `<delim>` = 1, then the `max_chars` most frequent characters by falling frequency;
- Guo et al.'s (`BigramTask.tiny_shakespeare()`, `BigramTask.from_text_guo`): the text's
  characters by code point are ids 0..n-1 (BBM/data/prepare.py: `sorted(set(data))`), BOS is n
  and the delimiter n + 1 (BBM/data.py, `MetaProcess.add_bos` / `add_delimiter`). For
  tiny-Shakespeare that is 65 characters, BOS 65, delimiter 66: 67 tokens. The counts ship in
  `tokenprobe/data/tiny_shakespeare_bigrams.json` (made by benchmarks/guo_bigrams.py from their
  BBM/data/bos1_d0/config.yaml and equal to the counts of the text itself).

The sampler is Guo et al.'s `bbm.gen_seq` (BBM/data.py): BOS; a first character from the unigram
of non-trigger characters (`Dataset.no_trigger_init`); then after a trigger (one of the
`n_triggers` most frequent characters) a copy of the token before it, else a draw from the
bigram row of the current token. With `smoothing` 0 its distribution is theirs exactly.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

BOS, DELIM = "<bos>", "<delim>"
GUO_STATS = "data/tiny_shakespeare_bigrams.json"


@dataclasses.dataclass(frozen=True)
class BigramTask:
    """The data distribution: characters, their counts and bigram counts from one text.

    Attributes:
        chars: the character vocabulary, in token-id order.
        char_counts: occurrences of each character in the (filtered) text.
        bigrams: bigrams[i][j] = times chars[j] follows chars[i].
        n_triggers: the `n_triggers` most frequent characters are triggers (ties: lower id).
        smoothing: add-alpha pseudo-count on every bigram and unigram count (Guo et al.: 0).
        specials_first: True: `<bos>` = 0, `<delim>` = 1, characters from 2 (tokenprobe's);
            False: characters from 0, then `<bos>`, `<delim>` (Guo et al.'s).
    """

    chars: tuple[str, ...]
    char_counts: tuple[int, ...]
    bigrams: tuple[tuple[int, ...], ...]
    n_triggers: int = 3
    smoothing: float = 0.1
    specials_first: bool = True

    def __post_init__(self) -> None:
        if len(self.chars) <= self.n_triggers:
            raise ValueError(f"{len(self.chars)} characters; need more than {self.n_triggers} "
                             "triggers")
        triggers = {i - self.char_offset for i in self.trigger_ids}
        dead = [ch for i, ch in enumerate(self.chars)
                if i not in triggers and sum(self.bigrams[i]) + self.smoothing == 0]
        if dead:
            raise ValueError(f"characters {dead!r} are never followed by another: with smoothing "
                             "0 they have no next-token distribution")

    @classmethod
    def from_text(cls, text: str, *, max_chars: int = 65, n_triggers: int = 3,
                  smoothing: float = 0.1) -> BigramTask:
        """tokenprobe's rule: the `max_chars` most frequent characters of `text`, by falling
        frequency (ties by code point); the others are dropped before counting bigrams."""
        ranked = sorted(Counter(text).items(), key=lambda kv: (-kv[1], kv[0]))[:max_chars]
        if len(ranked) <= n_triggers:
            raise ValueError(f"{len(ranked)} characters; need more than {n_triggers} triggers")
        return cls._count(text, [ch for ch, _ in ranked], n_triggers=n_triggers,
                          smoothing=smoothing, specials_first=True)

    @classmethod
    def from_text_guo(cls, text: str, *, n_triggers: int = 3,
                      smoothing: float = 0.0) -> BigramTask:
        """Guo et al.'s rule (BBM/data/prepare.py): every character of `text`, by code point,
        ids 0..n-1, then BOS and the delimiter; bigrams are all adjacent pairs of the text."""
        return cls._count(text, sorted(set(text)), n_triggers=n_triggers, smoothing=smoothing,
                          specials_first=False)

    @classmethod
    def tiny_shakespeare(cls, *, n_triggers: int = 3, smoothing: float = 0.0) -> BigramTask:
        """Guo et al.'s statistics: tiny-Shakespeare's 65 characters, `tokenprobe/data/
        tiny_shakespeare_bigrams.json` (its header gives the provenance)."""
        raw = json.loads(resources.files("tokenprobe").joinpath(GUO_STATS).read_text("utf-8"))
        return cls(tuple(raw["chars"]), tuple(raw["char_counts"]),
                   tuple(map(tuple, raw["bigrams"])), n_triggers, smoothing, False)

    @classmethod
    def _count(cls, text: str, chars: list[str], **kwargs) -> BigramTask:
        index = {ch: i for i, ch in enumerate(chars)}
        kept = [index[ch] for ch in text if ch in index]
        pairs, n = Counter(zip(kept, kept[1:])), len(chars)
        counts = Counter(kept)
        bigrams = tuple(tuple(pairs.get((i, j), 0) for j in range(n)) for i in range(n))
        return cls(tuple(chars), tuple(counts[i] for i in range(n)), bigrams, **kwargs)

    @property
    def char_offset(self) -> int:
        """Token id of `chars[0]`."""
        return 2 if self.specials_first else 0

    @property
    def bos_id(self) -> int:
        return 0 if self.specials_first else len(self.chars)

    @property
    def delim_id(self) -> int:
        return 1 if self.specials_first else len(self.chars) + 1

    @property
    def vocab(self) -> list[str]:
        """Token strings by id."""
        return [BOS, DELIM, *self.chars] if self.specials_first else [*self.chars, BOS, DELIM]

    @property
    def trigger_ids(self) -> list[int]:
        """Token ids of the `n_triggers` most frequent characters, ascending (Guo et al.,
        `Dataset.__init__`: the top `k` of the unigram's argsort)."""
        ranked = sorted(range(len(self.chars)), key=lambda i: (-self.char_counts[i], i))
        return sorted(self.char_offset + i for i in ranked[:self.n_triggers])

    def transitions(self) -> torch.Tensor:
        """(V, V) float64 next-token probabilities used by the sampler.

        Character rows are the smoothed bigram model over characters. Rows of BOS, the
        delimiter and the triggers (never sampled from: triggers copy) are the smoothed unigram
        of non-trigger characters, the distribution of the first token after BOS.
        """
        n, off = len(self.chars), self.char_offset
        chars = slice(off, off + n)
        probs = torch.zeros(n + 2, n + 2, dtype=torch.float64)
        counts = torch.tensor(self.bigrams, dtype=torch.float64) + self.smoothing  # (n, n)
        probs[chars, chars] = counts / counts.sum(-1, keepdim=True)
        start = torch.tensor(self.char_counts, dtype=torch.float64) + self.smoothing  # (n,)
        start = start / start.sum()  # the unigram, then without triggers, renormalised
        triggers = torch.tensor(self.trigger_ids)  # (Guo et al.'s order of operations)
        start[triggers - off] = 0.0  # no trigger right after BOS
        rows = torch.cat([torch.tensor([self.bos_id, self.delim_id]), triggers])
        probs[rows, chars] = start / start.sum()
        return probs

    def sample(self, n: int, *, length: int = 256, generator: torch.Generator) -> torch.Tensor:
        """(n, length) int64 sequences, BOS first, drawn with `generator` only."""
        probs = self.transitions()
        is_trigger = torch.isin(torch.arange(len(probs)), torch.tensor(self.trigger_ids))
        seqs = torch.full((n, length), self.bos_id, dtype=torch.long)  # column 0 is BOS
        for t in range(1, length):
            prev = seqs[:, t - 1]  # (n,)
            drawn = torch.multinomial(probs[prev], 1, generator=generator).squeeze(1)  # (n,)
            copied = seqs[:, t - 2] if t >= 2 else drawn
            seqs[:, t] = torch.where(is_trigger[prev], copied, drawn)
        return seqs

    def oracle_nll(self, seqs: torch.Tensor) -> float:
        """Mean NLL of the next token under the true distribution (0 after a trigger), the
        floor of the training loss on `seqs` (N, T)."""
        probs = self.transitions()
        prev, nxt = seqs[:, :-1], seqs[:, 1:]  # (N, T-1)
        nll = -probs[prev, nxt].log()
        nll[torch.isin(prev, torch.tensor(self.trigger_ids))] = 0.0
        return float(nll.mean())


def default_text() -> str:
    """The project's toy text, `tokenprobe/data/toy_text.txt`."""
    return resources.files("tokenprobe").joinpath("data/toy_text.txt").read_text("utf-8")


def char_tokenizer(task: BigramTask) -> PreTrainedTokenizerFast:
    """One token per character of `task`, `<bos>` prepended; unknown characters are dropped.

    A BPE model with an empty merge list and no pre-tokenizer splits the text into single
    characters, spaces and newlines included; the `Fuse` decoder joins them back unchanged.
    """
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(task.vocab)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, task.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS,
                                   additional_special_tokens=[DELIM],
                                   clean_up_tokenization_spaces=False)
