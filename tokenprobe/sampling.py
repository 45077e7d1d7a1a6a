"""Batched sampling of many continuations of one prefix that share the prefix's key/value cache.

Rollout search (Lin et al., "Critical Tokens Matter", chenzhiling9954/Critical-Tokens-Matter)
samples n continuations of every prefix of a trajectory. Re-encoding the prefix for each of them
(what `generate` on a batch of n copies does) costs n prefix forwards; here the prefix runs once
with `use_cache=True`, its `DynamicCache` is replicated to the batch, and the batch decodes one
token per step, dropping each row from the cache as it ends (EOS, the caller's stop test, or the
length limit).

Every continuation has its own seed: step s of row r draws u ~ U[0, 1) from
`torch.Generator().manual_seed(seed_r)` and takes the inverse-CDF sample of
softmax(logits / temperature), so a continuation depends on its prefix and seed only, not on the
batch it ran in. `sample_reference` does the same with a full forward per step (no cache), the
oracle of the tests.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

StopFn = Callable[[list[int]], bool]


@dataclass(frozen=True)
class Continuation:
    """One sampled continuation.

    Attributes:
        ids: the sampled token ids (an EOS that ended it included).
        finish: "eos", "stop" (the stop test fired) or "length".
        seed: the seed of its uniform draws.
    """

    ids: list[int]
    finish: str
    seed: int


def draw(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float,
         ban: int | None = None) -> torch.Tensor:
    """Inverse-CDF samples from softmax(logits / temperature), one per row.

    Args:
        logits: (B, V) next-token logits.
        uniforms: (B,) draws in [0, 1), float64.
        temperature: > 0; 0 means greedy (argmax, the uniforms unused).
        ban: a token id whose probability is set to 0 before renormalising (cDPO's
            counterfactual resampling of a critical token).

    Returns:
        (B,) int64 token ids: the first v with cdf[v] > u * cdf[V - 1].
    """
    logits = logits.double()
    if ban is not None:
        logits = logits.clone()
        logits[:, ban] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids.clamp(max=probs.shape[-1] - 1)


def _uniforms(generators: list[torch.Generator], rows: list[int]) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64)
                        for r in rows])


def _finished(ids: list[int], eos: frozenset[int], stop: StopFn | None) -> str | None:
    if ids[-1] in eos:
        return "eos"
    if stop is not None and stop(ids):
        return "stop"
    return None


@torch.inference_mode()
def sample_continuations(model: PreTrainedModel, prefix: Sequence[int], seeds: Sequence[int], *,
                         temperature: float, max_new_tokens: int,
                         eos_ids: Sequence[int] = (), stop: StopFn | None = None,
                         ban_first: int | None = None, batch_size: int = 16,
                         on_batch: Callable[[int], None] | None = None) -> list[Continuation]:
    """Sample one continuation of `prefix` per seed, sharing the prefix's KV cache.

    Args:
        model: a causal LM whose forward accepts `past_key_values` (a `DynamicCache`).
        prefix: the prefix token ids (not empty).
        seeds: one seed per continuation; results come back in this order.
        temperature: sampling temperature (0: greedy).
        max_new_tokens: the length limit of each continuation.
        eos_ids: ids that end a continuation (kept as its last token).
        stop: called with a row's continuation ids after each step; True ends it.
        ban_first: a token id the first sampled token may not be.
        batch_size: continuations decoded together; each batch copies the prefix cache.
        on_batch: called with the number of continuations finished after each batch.

    Returns:
        A `Continuation` per seed.
    """
    if not prefix:
        raise ValueError("sample_continuations needs a non-empty prefix")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True,
                logits_to_keep=1)
    cache, first_logits = out.past_key_values, out.logits[:, -1]  # (1, V)
    eos = frozenset(int(e) for e in eos_ids)
    results: list[Continuation] = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(chunk))  # (B, H, T, D) per layer
        results += _decode(model, batch_cache, first_logits.expand(len(chunk), -1), chunk,
                           temperature=temperature, max_new_tokens=max_new_tokens, eos=eos,
                           stop=stop, ban_first=ban_first)
        if on_batch is not None:
            on_batch(len(chunk))
    return results


def _decode(model: PreTrainedModel, cache, logits: torch.Tensor, seeds: list[int], *,
            temperature: float, max_new_tokens: int, eos: frozenset[int], stop: StopFn | None,
            ban_first: int | None) -> list[Continuation]:
    """Decode one batch step by step from `cache` (rows aligned with `seeds`)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids: list[list[int]] = [[] for _ in seeds]
    finish = ["length"] * len(seeds)
    active = list(range(len(seeds)))  # batch row j of the cache is sequence active[j]
    for step in range(max_new_tokens):
        tokens = draw(logits, _uniforms(generators, active), temperature=temperature,
                      ban=ban_first if step == 0 else None)  # (B,)
        keep = []
        for j, row in enumerate(active):
            ids[row].append(int(tokens[j]))
            ended = _finished(ids[row], eos, stop)
            if ended:
                finish[row] = ended
            else:
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            tokens, active = tokens[index], [active[j] for j in keep]
        logits = model(input_ids=tokens[:, None], past_key_values=cache,
                       use_cache=True).logits[:, -1]  # (B, V)
    return [Continuation(i, f, int(s)) for i, f, s in zip(ids, finish, seeds)]


@torch.inference_mode()
def sample_reference(model: PreTrainedModel, prefix: Sequence[int], seed: int, *,
                     temperature: float, max_new_tokens: int, eos_ids: Sequence[int] = (),
                     stop: StopFn | None = None, ban_first: int | None = None) -> Continuation:
    """One continuation with a full forward of prefix + continuation per step (no cache).

    The same draws as `sample_continuations` for the same seed; the test oracle, and slow.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    eos = frozenset(int(e) for e in eos_ids)
    ids: list[int] = []
    for step in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([list(prefix) + ids], device=device),
                       use_cache=False).logits[:, -1]
        token = draw(logits, _uniforms([generator], [0]), temperature=temperature,
                     ban=ban_first if step == 0 else None)
        ids.append(int(token[0]))
        ended = _finished(ids, eos, stop)
        if ended:
            return Continuation(ids, ended, int(seed))
    return Continuation(ids, "length", int(seed))


def eos_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """The ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        values = source if isinstance(source, (list, tuple)) else [source]
        found += [int(v) for v in values if v is not None and int(v) not in found]
    return found
