"""What an attribution explains: a target value f of a prompt (a continuation's log-prob, the
greedy next token's, or a contrast of two options), scored from token ids (batched, no graph)
or from input embeddings (differentiable, for the gradient methods)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tokenprobe.analyses.attribution import target_logprob
from tokenprobe.models import LoadedModel
from tokenprobe.placement import input_device

TARGET_KINDS = ("continuation", "greedy", "contrast")


@dataclass(frozen=True)
class Target:
    """The value f(prompt) an attribution explains.

    Attributes:
        kind: "continuation" (total teacher-forced log-prob of `ids` after the prompt, nats),
            "greedy" (the same for the one-token `ids`, the full prompt's argmax next token) or
            "contrast" (log p(ids | prompt) - log p(alt_ids | prompt), each option's total
            teacher-forced log-prob: the discrete-choice decision).
        ids: the continuation / greedy token / option a.
        alt_ids: option b of a contrast (else empty).
        text: readable text of the target (for tables and titles).
    """

    kind: str
    ids: tuple[int, ...] = ()
    alt_ids: tuple[int, ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; use one of {TARGET_KINDS}")
        if not self.ids or (self.kind == "contrast") != bool(self.alt_ids):
            raise ValueError("a target needs ids, and alt_ids exactly when it is a contrast")

    def describe(self) -> str:
        """One line, e.g. `log p(' Paris') (continuation, 1 token)`."""
        if self.kind == "contrast":
            return f"log p(a) - log p(b), {self.text} (contrast)"
        return f"log p({self.text!r}) ({self.kind}, {len(self.ids)} token(s))"

    def options(self) -> list[tuple[tuple[int, ...], float]]:
        """(token ids, sign) of each scored option: f = sum of sign * log p(ids | prompt)."""
        if self.kind == "contrast":
            return [(self.ids, 1.0), (self.alt_ids, -1.0)]
        return [(self.ids, 1.0)]


def _ids(tokenizer, value: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(tokenizer(value, add_special_tokens=False)["input_ids"])
    return tuple(int(i) for i in value)


def resolve_target(loaded: LoadedModel, prompt_ids: Sequence[int], *,
                   continuation: str | Sequence[int] | None = None,
                   options: tuple[str | Sequence[int], str | Sequence[int]] | None = None
                   ) -> Target:
    """The `Target` of a prompt: a continuation (text tokenised with add_special_tokens=False,
    or ids), a contrast of two `options` (a, b), or neither: the greedy next token of the full
    prompt. ValueError for both, an empty prompt or an option / continuation of no tokens."""
    tok = loaded.tokenizer
    if continuation is not None and options is not None:
        raise ValueError("give a continuation or options, not both")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    if options is not None:
        a, b = (_ids(tok, o) for o in options)
        if not a or not b:
            raise ValueError("each option needs at least one token")
        if a == b:
            raise ValueError("the two options are the same tokens; the contrast would be 0")
        return Target("contrast", a, b, f"{tok.decode(list(a))!r} vs {tok.decode(list(b))!r}")
    if continuation is not None:
        ids = _ids(tok, continuation)
        if not ids:
            raise ValueError("the continuation has no tokens")
        return Target("continuation", ids, (), tok.decode(list(ids)))
    device = input_device(loaded.model)
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([list(prompt_ids)], device=device),
                              use_cache=False, logits_to_keep=1).logits
    y = int(logits[0, -1].argmax())
    return Target("greedy", (y,), (), tok.decode([y]))


def embed(loaded: LoadedModel, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The embeddings the model consumes for `ids` through `inputs_embeds`: its input
    embedding module's output. For Gemma 3 that module (Gemma3TextScaledWordEmbedding) already
    multiplies by sqrt(d), and HF Gemma3 does not scale `inputs_embeds` again, so these are the
    scaled vectors. (T, d) for a 1-D `ids`, (B, T, d) for 2-D."""
    module = loaded.model.get_input_embeddings()
    ids = torch.as_tensor(ids, dtype=torch.long, device=module.weight.device)
    return module(ids)


def score_ids(loaded: LoadedModel, sequences: Sequence[Sequence[int]], target: Target, *,
              batch_size: int = 16, progress: Callable[[int], object] | None = None
              ) -> np.ndarray:
    """f(target) for each prompt id sequence (any lengths, at least one token each).

    Each option's tokens are appended to each sequence and scored by teacher forcing; when
    every option is one token (a greedy target, a contrast of one-token answers) a sequence
    is one row and its options are read from the same next-token distribution. Rows are
    left-padded with an attention mask and position ids that count real tokens only, so each
    scores as its unpadded self, and only the last positions' logits are computed. No graph.

    Args:
        loaded: a `tokenprobe.load()` result.
        sequences: N prompt id sequences (e.g. the prompt with some units removed).
        target: what is scored.
        batch_size: rows per forward.
        progress: called with the number of rows done in each forward (a tqdm bar's `update`
            or the bar itself).

    Returns:
        (N,) float64 target values (nats).
    """
    seqs = [list(map(int, s)) for s in sequences]
    if any(not s for s in seqs):
        raise ValueError("every sequence needs at least one token to predict the target from")
    model, device = loaded.model, input_device(loaded.model)
    pad = loaded.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    options = target.options()
    if all(len(opt) == 1 for opt, _ in options):  # one row: all options at its last position
        jobs = [(i, s, [], options) for i, s in enumerate(seqs)]
    else:
        jobs = [(i, s, list(opt), [(opt, sign)]) for i, s in enumerate(seqs)
                for opt, sign in options]
    out = np.zeros(len(seqs), dtype=np.float64)
    update = getattr(progress, "update", progress)
    with torch.inference_mode():
        for a in range(0, len(jobs), batch_size):
            chunk = jobs[a:a + batch_size]
            rows = [s + tail for _, s, tail, _ in chunk]
            width = max(len(r) for r in rows)
            keep = max(len(tail) for _, _, tail, _ in chunk) + 1
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, width - len(row):] = torch.tensor(row)
                mask[r, width - len(row):] = 1
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=pos.to(device), use_cache=False,
                           logits_to_keep=keep).logits  # (b, keep, V), row ends aligned
            for r, (i, _, tail, scored) in enumerate(chunk):
                for opt, sign in scored:
                    m = len(opt)
                    pred = logits[r, keep - 1 - len(tail):keep - 1 - len(tail) + m]  # (m, V)
                    want = torch.tensor(list(opt), device=pred.device)
                    out[i] += sign * float(target_logprob(pred[None], want)[0])
            if update is not None:
                update(len(chunk))
    return out


def score_embeds(loaded: LoadedModel, embeds: torch.Tensor, attention_mask: torch.Tensor,
                 target: Target) -> torch.Tensor:
    """f(target) per row from prompt embeddings, differentiable w.r.t. `embeds`.

    The target tokens' input embeddings (`embed`) are appended to each row; position ids
    follow the attention mask (cumulative count of real tokens), so a left-padded row (mask 0
    at its start) scores as its unpadded self. Padding elsewhere is not supported: the
    appended target would sit after the holes.

    Args:
        embeds: (B, T, d) prompt embeddings as the model consumes them (see `embed`).
        attention_mask: (B, T), 1 for real tokens, 0 for left padding.
        target: what is scored.

    Returns:
        (B,) float64 target values (log-softmax in float64 of the model's logits).
    """
    model = loaded.model
    bsz, t, _ = embeds.shape
    mask = attention_mask.to(embeds.device).long()
    total = torch.zeros(bsz, dtype=torch.float64, device=embeds.device)
    for opt, sign in target.options():
        m = len(opt)
        tail = embed(loaded, list(opt)).to(embeds.dtype).to(embeds.device)  # (m, d)
        full = torch.cat([embeds, tail.expand(bsz, m, -1)], 1)  # (B, T + m, d)
        full_mask = torch.cat([mask, mask.new_ones(bsz, m)], 1)  # (B, T + m)
        pos = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(inputs_embeds=full, attention_mask=full_mask, position_ids=pos,
                       use_cache=False, logits_to_keep=m + 1).logits[:, :-1]  # (B, m, V)
        total = total + sign * target_logprob(logits, torch.tensor(opt, device=logits.device))
    return total
