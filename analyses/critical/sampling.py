"""Batched sampling of many continuations of prefixes that share their key/value cache.

Rollout search (Lin et al., "Critical Tokens Matter", chenzhiling9954/Critical-Tokens-Matter)
samples n continuations of every prefix of a trajectory. Re-encoding the prefix for each of them
(what `generate` on a batch of n copies does) costs n prefix forwards; here a trajectory runs
once with `use_cache=True`, each row of a decode batch reads its own prefix's part of that cache
(`sample_jobs`: rows of several prefixes decode together), and the batch decodes one token per
step into a preallocated cache, dropping each row as it ends (EOS, the caller's stop test, or
the length limit).

Every continuation has its own seed: step s of row r draws u ~ U[0, 1) from
`torch.Generator().manual_seed(seed_r)` and takes the inverse-CDF sample of
softmax(logits / temperature), so a continuation depends on its prefix and seed only, not on the
batch it ran in. A job may draw its first token at another temperature and without one token
(`Job.first_temperature`, `Job.ban_first`): cDPO's counterfactual check draws the replacement of
a critical token from the temperature-1 softmax with the original token's probability set to 0
and renormalised (`generate_with_and_without_for_sampling` in the authors'
`src/rollout_sampling_for_critical_tokens.py`), then rolls it out at the rollout temperature.
`sample_reference` does the same with a full forward per step (no cache), the oracle of the
tests.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

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


def _draw_first(logits: torch.Tensor, uniforms: torch.Tensor, jobs: list[Job], *,
                temperature: float) -> torch.Tensor:
    """The first tokens of a batch (row r of job `jobs[r]`): each row's ban and temperature."""
    bans = [(r, job.ban_first) for r, job in enumerate(jobs) if job.ban_first is not None]
    if bans:
        logits = logits.double().clone()
        logits[[r for r, _ in bans], [b for _, b in bans]] = float("-inf")
    temps = [temperature if job.first_temperature is None else job.first_temperature
             for job in jobs]
    if len(set(temps)) == 1:
        return draw(logits, uniforms, temperature=temps[0])
    tokens = torch.empty(len(jobs), dtype=torch.long, device=logits.device)
    for value in sorted(set(temps)):  # draw is row-wise: one call per temperature
        rows = [r for r, t in enumerate(temps) if t == value]
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = draw(logits[index], uniforms[rows], temperature=value)
    return tokens


def _finished(ids: list[int], eos: frozenset[int], stop: StopFn | None) -> str | None:
    if ids[-1] in eos:
        return "eos"
    if stop is not None and stop(ids):
        return "stop"
    return None


@dataclass(frozen=True)
class Job:
    """Continuations to sample from one prefix.

    Attributes:
        prefix: the prefix token ids (not empty).
        seeds: one seed per continuation.
        stop: called with a row's continuation ids after each step; True ends it.
        ban_first: a token id the first sampled token may not be.
        first_temperature: the temperature of the first sampled token; None: the sampling
            temperature (cDPO's counterfactual replacement: 1).
    """

    prefix: Sequence[int]
    seeds: Sequence[int]
    stop: StopFn | None = None
    ban_first: int | None = None
    first_temperature: float | None = None


@torch.inference_mode()
def sample_continuations(model: PreTrainedModel, prefix: Sequence[int], seeds: Sequence[int], *,
                         temperature: float, max_new_tokens: int,
                         eos_ids: Sequence[int] = (), stop: StopFn | None = None,
                         ban_first: int | None = None, first_temperature: float | None = None,
                         batch_size: int = 16,
                         on_batch: Callable[[int], None] | None = None) -> list[Continuation]:
    """Sample one continuation of `prefix` per seed, sharing the prefix's KV cache.

    `sample_jobs` with one job; see there. Returns a `Continuation` per seed, in seed order.
    """
    return sample_jobs(model, [Job(prefix, seeds, stop, ban_first, first_temperature)],
                       temperature=temperature,
                       max_new_tokens=max_new_tokens, eos_ids=eos_ids, batch_size=batch_size,
                       on_batch=on_batch)[0]


@torch.inference_mode()
def sample_jobs(model: PreTrainedModel, jobs: Sequence[Job], *, temperature: float,
                max_new_tokens: int, eos_ids: Sequence[int] = (), batch_size: int = 16,
                on_batch: Callable[[int], None] | None = None) -> list[list[Continuation]]:
    """Sample the continuations of several prefixes, decoding rows of all of them together.

    Prefixes that are prefixes of one another (a trajectory's prefixes in a rollout search)
    share one forward: the longest is encoded once, with the logits kept at each shorter
    prefix's last position, and a row of prefix length L reads the first L cached positions.
    A decode batch of `batch_size` rows may mix prefixes: its cache holds each row's prefix
    left-aligned, the slots between a shorter prefix and the longest are masked out of
    attention (a 2-D attention mask) and each row's new tokens get their true positions.
    Models with sliding-window layers (whose cache keeps only the window) encode every
    prefix on its own and decode one prefix per batch. The cache is preallocated for the
    whole decode, so a step writes one slot instead of concatenating the cache.

    A continuation depends on its prefix and seed only, not on the batch it ran in (up to
    float rounding in the attention, which the tests pin against a full re-encode per step).

    Args:
        model: a causal LM whose forward accepts `past_key_values` (a `DynamicCache`),
            `attention_mask` and `position_ids`.
        jobs: the prefixes with their seeds, stop tests, first-token bans and temperatures.
        temperature: sampling temperature (0: greedy).
        max_new_tokens: the length limit of each continuation.
        eos_ids: ids that end a continuation (kept as its last token).
        batch_size: rows (continuations) decoded together.
        on_batch: called with the number of continuations finished after each batch.

    Returns:
        Per job, a `Continuation` per seed, in seed order.
    """
    if any(not job.prefix for job in jobs):
        raise ValueError("sample_continuations needs a non-empty prefix")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = frozenset(int(e) for e in eos_ids)
    shared = not _has_window_layers(model)
    roots, first_logits = _encode(model, [list(job.prefix) for job in jobs], shared=shared)
    if shared:  # rows of all jobs, in job order
        rows = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.seeds))]
        chunks = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    else:  # one prefix per batch: no row may wait in a hole of a windowed cache
        chunks = [[(j, i) for i in range(s, min(s + batch_size, len(job.seeds)))]
                  for j, job in enumerate(jobs) for s in range(0, len(job.seeds), batch_size)]
    results: list[list[Continuation | None]] = [[None] * len(job.seeds) for job in jobs]
    for chunk in chunks:
        conts = _decode(model, [jobs[j] for j, _ in chunk], [roots[j] for j, _ in chunk],
                        torch.cat([first_logits[j] for j, _ in chunk]),
                        [int(jobs[j].seeds[i]) for j, i in chunk], temperature=temperature,
                        max_new_tokens=max_new_tokens, eos=eos)
        for (j, i), cont in zip(chunk, conts):
            results[j][i] = cont
        if on_batch is not None:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]


def _has_window_layers(model: PreTrainedModel) -> bool:
    config = model.config.get_text_config()
    return any("sliding" in str(kind) or "chunked" in str(kind)
               for kind in getattr(config, "layer_types", None) or ()) or bool(
        getattr(config, "sliding_window", None) and not getattr(config, "layer_types", None))


def _encode(model: PreTrainedModel, prefixes: list[list[int]], *, shared: bool):
    """One forward per root (a prefix no other prefix extends, when `shared`).

    Returns per prefix its root's cache (a `DynamicCache` of batch 1) and its next-token
    logits (1, V).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prefixes)), key=lambda j: -len(prefixes[j]))
    root_of: dict[int, int] = {}
    for j in order:  # longest first: a prefix's root is an earlier root that extends it
        roots = set(root_of.values()) if shared else ()
        root_of[j] = next((r for r in roots if prefixes[r][:len(prefixes[j])] == prefixes[j]), j)
    caches, logits = {}, {}
    for root in sorted(set(root_of.values())):
        members = [j for j in root_of if root_of[j] == root]
        ends = sorted({len(prefixes[j]) - 1 for j in members})
        out = model(input_ids=torch.tensor([prefixes[root]], device=device), use_cache=True,
                    logits_to_keep=torch.tensor(ends, device=device))
        caches[root] = out.past_key_values
        for j in members:
            logits[j] = out.logits[:, ends.index(len(prefixes[j]) - 1)]  # (1, V)
    return ([(caches[root_of[j]], len(prefixes[j])) for j in range(len(prefixes))],
            [logits[j] for j in range(len(prefixes))])


class _Preallocated(DynamicLayer):
    """A cache layer whose keys and values live in buffers sized for the whole decode.

    `update` writes the new slots in place instead of concatenating (which copies the whole
    cache every step); `keys` and `values` are views of the filled part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.device, self.is_initialized = keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._view()


def _batch_cache(roots: list[tuple[DynamicCache, int]], capacity: int) -> DynamicCache:
    """A batch cache: row r holds the first L_r positions of its root, left-aligned."""
    first = roots[0][0]
    if not all(type(layer) is DynamicLayer for layer in first.layers):  # windowed: one prefix
        cache = copy.deepcopy(first)
        cache.batch_repeat_interleave(len(roots))
        return cache
    width = max(length for _, length in roots)
    groups: dict[tuple[int, int], list[int]] = {}
    for r, (root, length) in enumerate(roots):
        groups.setdefault((id(root), length), []).append(r)
    cache = copy.copy(first)
    cache.layers = []
    for index, layer in enumerate(first.layers):
        batch, heads, _, dim = layer.keys.shape
        buffers = [layer.keys.new_zeros(len(roots), heads, width + capacity, dim)
                   for _ in range(2)]
        for (_, length), members in groups.items():
            source = roots[members[0]][0].layers[index]
            rows = torch.tensor(members, device=layer.keys.device)
            buffers[0][rows, :, :length] = source.keys[:, :, :length]
            buffers[1][rows, :, :length] = source.values[:, :, :length]
        cache.layers.append(_Preallocated(buffers[0], buffers[1], width))
    return cache


def _decode(model: PreTrainedModel, jobs: list[Job], roots: list[tuple[DynamicCache, int]],
            logits: torch.Tensor, seeds: list[int], *, temperature: float, max_new_tokens: int,
            eos: frozenset[int]) -> list[Continuation]:
    """Decode one batch step by step (row r continues `jobs[r].prefix` with `seeds[r]`)."""
    device = logits.device
    lengths = torch.tensor([length for _, length in roots], device=device)  # (B,)
    width = int(lengths.max())
    cache = _batch_cache(roots, max_new_tokens)
    holes = bool((lengths < width).any())
    slots = torch.arange(width + max_new_tokens, device=device)
    mask = ((slots < lengths[:, None]) | (slots >= width)).long()  # (B, width + new)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids: list[list[int]] = [[] for _ in seeds]
    finish = ["length"] * len(seeds)
    active = list(range(len(seeds)))  # batch row j of the cache is sequence active[j]
    for step in range(max_new_tokens):
        uniforms = _uniforms(generators, active)
        tokens = (_draw_first(logits, uniforms, jobs, temperature=temperature) if step == 0
                  else draw(logits, uniforms, temperature=temperature))  # (B,)
        keep = []
        for j, row in enumerate(active):
            ids[row].append(int(tokens[j]))
            ended = _finished(ids[row], eos, jobs[row].stop)
            if ended:
                finish[row] = ended
            else:
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, active = tokens[index], [active[j] for j in keep]
            lengths, mask = lengths[index], mask[index]
        logits = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True,
                       attention_mask=mask[:, :width + step + 1] if holes else None,
                       position_ids=(lengths + step)[:, None]).logits[:, -1]  # (B, V)
    return [Continuation(i, f, int(s)) for i, f, s in zip(ids, finish, seeds)]


@torch.inference_mode()
def sample_reference(model: PreTrainedModel, prefix: Sequence[int], seed: int, *,
                     temperature: float, max_new_tokens: int, eos_ids: Sequence[int] = (),
                     stop: StopFn | None = None, ban_first: int | None = None,
                     first_temperature: float | None = None) -> Continuation:
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
        first = step == 0 and first_temperature is not None
        token = draw(logits, _uniforms([generator], [0]),
                     temperature=first_temperature if first else temperature,
                     ban=ban_first if step == 0 else None)
        ids.append(int(token[0]))
        ended = _finished(ids, eos, stop)
        if ended:
            return Continuation(ids, ended, int(seed))
    return Continuation(ids, "length", int(seed))

