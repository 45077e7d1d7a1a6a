"""Per-token statistics of the next-token distribution, streamed over the vocabulary, never (T, V).

One op, `linear_entropy(hidden, weight)`. With logits l = softcap(hidden @ weight.T + bias),
softcap(x) = c tanh(x / c) (Gemma 2's final_logit_softcapping), and p = softmax(l), per token
(definitions and conventions: README, "Measures"):

- `lse` = log sum_v e^{l_v};
- `entropy` H(p) = -sum_v p_v log p_v, in nats;
- `self_certainty` = KL(U || p) = -(1/V) sum_v log(V p_v) = lse - mean_v(l_v) - log V
  (Kang et al. 2025, "Scalable Best-of-N Selection for Large Language Models via
  Self-Certainty", backprop07/Self-Certainty);
- `topk_ids`, `topk_probs` (T, k): the k most probable tokens, most probable first;
- with targets: `target_logprob` = log p[target] (NaN where target < 0) and `target_rank` =
  1 + #{v : l_v > l_target}, strictly larger, so tied tokens share the better rank (0 where
  target < 0).

Each token block folds vocabulary tiles into running m = max l, s = sum e^{l-m} and
u = sum e^{l-m} (l-m), rescaled exactly when m grows (flash-attention style): lse = m + log s and
H = log s - u/s, with no cancellation against a large lse.

The rank is exact in the tiles' own arithmetic: the target's logit is picked out of its tile,
never taken from a separately rounded dot product. Tiles are compared with an estimate t~ of it
(computed up front). On the torch path each tile counts the other logits above t~ + b and above
t~ - b (b = BAND (|t~| + 1), about ten float32 ulps; the estimate has been within a quarter of
it on real text). A tile whose two counts differ by more than its target has other logits in
the band (a near-tie or an equal unembedding row: 2-4% of real tokens); those few values are
kept, and after the sweep the ones above the target's tile value are added to the first count,
which is then exact. A token whose tile value lies outside its band is run again by itself,
every statistic of it from that smaller run, which is recounted against its tiles' own values
(bitwise the same on recomputation). The Triton kernel tracks the nearest other logits on
either side of t~ instead and recounts its block.

Implementations (`impl`): "reference" (full float64 logits; tests only), "torch" (token_chunk x
vocab_chunk tiles, float32 logits even for bf16/fp16 inputs; the CPU path and CUDA fallback),
"triton" (a program per block of tokens looping over vocabulary tiles; CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (triton on CUDA when it imports and topk <= 4, else torch);
"triton" runs only after its first-use self-check on the device (kernels/selfcheck.py).
Ties in top-k: lowest id first in "reference" and "triton"; in "torch" in torch.topk's order.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenprobe.kernels.common import IMPLS, NO_FLOAT64, check_impl, resolve_impl, tanh_cap
from tokenprobe.kernels.target_rank import (BAND, _keep_band, _target_estimate,
                                             _target_outputs)

TRITON_MAX_TOPK = 4
NEG = -1e30  # finite "minus infinity" for the running max: s * (NEG - m) = 0, never NaN


@torch.no_grad()  # a measurement: never a graph, whatever the weight requires
def linear_entropy(hidden: Tensor, weight: Tensor, *, bias: Tensor | None = None,
                   softcap: float | None = None, targets: Tensor | None = None, topk: int = 2,
                   impl: str = "auto", token_chunk: int = 512,
                   vocab_chunk: int = 4096) -> dict[str, Tensor]:
    """Entropy, lse, self-certainty, top-k and target log-prob/rank per token.

    Args:
        hidden: (T, D) final-normed hidden states.
        weight: (V, D) unembedding; its dtype may differ from hidden's (both are upcast).
        bias: (V,) logit bias, or None.
        softcap: final-logit soft-capping l = c tanh(l / c) (Gemma 2), or None.
        targets: (T,) integer token ids in [0, V); negative = no target for that row.
        topk: number of most probable tokens returned, 1 <= topk <= V (<= 4 for triton).
        impl: "auto", "torch", "triton" or "reference".
        token_chunk, vocab_chunk: tile size of the torch path. Its extra memory is about 5
            float32 tiles (token_chunk x vocab_chunk; measured on CPU at the defaults
            512 x 4096, an 8 MiB tile: 40 MiB without targets, 43 MiB with them), plus float32
            copies of the (token_chunk + vocab_chunk, D) chunks for bf16/fp16 inputs (at most
            18 MiB at D = 1024) and O(T k) outputs, whatever T and V. The triton path takes
            them, as powers of two in [16, 64] and [16, 128], for its blocks.

    Runs without autograd (`torch.no_grad`), so a weight that requires grad (a model's own
    unembedding) builds no graph and keeps no tile alive; the outputs never require grad.

    Returns:
        float32 (T,) tensors `lse`, `entropy`, `self_certainty` (float64 for "reference" or
        a float64 input), `topk_ids` (T, k) int64, `topk_probs` (T, k); with targets also
        `target_logprob` (T,) and `target_rank` (T,) int64.
    """
    _check(hidden, weight, bias, softcap, targets, topk, impl, token_chunk, vocab_chunk)
    unfit = (f"impl='triton' supports topk <= {TRITON_MAX_TOPK}, got {topk}; use impl='torch'"
             if topk > TRITON_MAX_TOPK
             else NO_FLOAT64 if torch.float64 in (hidden.dtype, weight.dtype) else None)
    impl = resolve_impl(impl, hidden.device, unfit=unfit, op="linear_entropy")
    if targets is not None:
        targets = targets.to(hidden.device).long()
    if impl == "reference":
        return _reference(hidden, weight, bias, softcap, targets, topk)
    if impl == "triton":
        return _triton(hidden, weight, bias, softcap, targets, topk, token_chunk, vocab_chunk)
    return _chunked(hidden, weight, bias, softcap, targets, topk, token_chunk, vocab_chunk)


def _check(hidden, weight, bias, softcap, targets, topk, impl, token_chunk, vocab_chunk) -> None:
    check_impl(impl, IMPLS)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (T, D) and weight (V, D) with the same D, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    (t, _), v = hidden.shape, weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if not 1 <= topk <= v:
        raise ValueError(f"topk must be in [1, V] = [1, {v}], got {topk}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"chunks must be >= 1, got {token_chunk} and {vocab_chunk}")
    if targets is not None:
        if tuple(targets.shape) != (t,) or targets.dtype.is_floating_point \
                or targets.dtype == torch.bool:
            raise ValueError(f"targets must be an integer (T,) = ({t},) tensor, got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if t and int(targets.max()) >= v:
            raise ValueError(f"target ids must be < V = {v} (negative = no target), got "
                             f"{int(targets.max())}")


# ----------------------------------------------------------------------------- reference

def _reference(hidden, weight, bias, softcap, targets, k) -> dict[str, Tensor]:
    """Everything materialised in float64: log_softmax over the full (T, V) logits."""
    logits = hidden.double() @ weight.double().T  # (T, V)
    if bias is not None:
        logits = logits + bias.double()
    logits = tanh_cap(logits, softcap)
    logp = torch.log_softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k)
    out = {"lse": lse, "entropy": -(logp.exp() * logp).sum(-1),
           "self_certainty": lse - logits.mean(-1) - math.log(logits.shape[1]),
           "topk_ids": ids, "topk_probs": logp.gather(-1, ids).exp()}
    if targets is not None:
        idx = targets.clamp(min=0)[:, None]  # (T, 1)
        lt = logits.gather(-1, idx)
        out |= _target_outputs(targets, lt[:, 0], (logits > lt).sum(-1), lse)
    return out


# ----------------------------------------------------------------------------- torch path

def _tile(h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None) -> Tensor:
    """(Tc, D) x (Vc, D) -> (Tc, Vc) logits in h's (float32 or float64) dtype."""
    w = w.to(h.dtype)
    logits = h @ w.T if b is None else torch.addmm(b.to(h.dtype), h, w.T)
    return tanh_cap(logits, softcap, inplace=True)


def _step(logits: Tensor, m: Tensor, s: Tensor, u: Tensor, total: Tensor, v0: int | Tensor,
          tgt: Tensor | None, ref: Tensor | None, hit: Tensor, count: Tensor, near: Tensor,
          scratch: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, ...]:
    """Fold one (Tc, Vc) tile of logits (vocabulary ids v0..) into the running accumulators;
    returns them updated, in the argument order after `logits` (without v0, tgt, ref), then
    the tile's row max. Pure without `scratch`, so torch.compile can fuse it into a few passes
    over the tile (`compiled_step`); eager, two (Tc, Vc) `scratch` buffers take the
    intermediates (a comparison written as floats sums 4x faster than a bool tensor, whose
    sum converts it first). The top-k merge is `_merge_topk`'s."""
    vc = logits.shape[1]
    tile_max = logits.amax(1)
    m_new = torch.maximum(m, tile_max)
    if scratch is None:
        d = logits - m_new[:, None]  # (Tc, Vc)
        e = d.exp()
    else:
        d = torch.sub(logits, m_new[:, None], out=scratch[0])
        e = torch.exp(d, out=scratch[1])
    alpha = (m - m_new).exp()
    u = alpha * (u + s * (m - m_new)) + torch.linalg.vecdot(d, e)
    s = alpha * s + e.sum(1)
    total = total + logits.sum(1)
    if tgt is not None:
        inside = (tgt >= v0) & (tgt < v0 + vc)
        col = (tgt - v0).clamp(0, vc - 1)[:, None]  # (Tc, 1)
        own = torch.where(inside, logits.gather(1, col)[:, 0], -math.inf)  # the target's value
        hit = torch.where(inside, own, hit)
        lo, hi = ref[:, 0], ref[:, 1]  # the band around the estimate; lo = hi: exact

        def above(x: Tensor) -> Tensor:  # (Tc,) the tile's logits > x, as a float count
            if scratch is None:
                return (logits > x[:, None]).to(d.dtype).sum(1)
            return torch.gt(logits, x[:, None], out=scratch[0]).sum(1)  # exact below 2^24

        count = count + above(hi) - (own > hi).to(d.dtype)
        near = near + above(lo) - (own > lo).to(d.dtype)
    return m_new, s, u, total, hit, count, near, tile_max


def _merge_topk(logits: Tensor, best_v: Tensor, best_i: Tensor, tile_max: Tensor, v0: int
                ) -> tuple[Tensor, Tensor]:
    """The running top-k (Tc, k) merged with a tile's, for the rows where the tile has a logit
    above their k-th best (or a NaN): after the first tiles most rows have none, and
    torch.topk costs about a quarter of the tile's matmul. Ties keep the earlier id."""
    k = best_v.shape[1]
    need = ~(tile_max <= best_v[:, -1])  # NaN: merged, as topk orders it
    if not bool(need.any()):
        return best_v, best_i
    rows = None if bool(need.all()) else need.nonzero()[:, 0]
    tile = logits if rows is None else logits[rows]
    tv, ti = tile.topk(min(k, tile.shape[1]), dim=1)  # (R, k')
    old_v, old_i = (best_v, best_i) if rows is None else (best_v[rows], best_i[rows])
    cand_v, cand_i = torch.cat([old_v, tv], 1), torch.cat([old_i, ti + v0], 1)
    order = cand_v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    new_v, new_i = cand_v.gather(1, order), cand_i.gather(1, order)
    if rows is None:
        return new_v, new_i
    best_v, best_i = best_v.clone(), best_i.clone()
    best_v[rows], best_i[rows] = new_v, new_i
    return best_v, best_i


def _sweep(h, weight, bias, softcap, tgt, ref, k, vocab_chunk, *, token_chunk: int = 0,
           compiled: bool = False) -> dict[str, Tensor]:
    """One pass over the vocabulary for the token chunk h (Tc, D): the running accumulators.
    With `compiled`, full tiles (token_chunk x vocab_chunk) go through `compiled_step`; a last
    chunk of at least half token_chunk rows is padded with zero rows (no target) to one."""
    rows = h.shape[0]
    if compiled and token_chunk // 2 <= rows < token_chunk:
        pad = token_chunk - rows
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        if tgt is not None:
            tgt = torch.cat([tgt, tgt.new_full((pad,), -1)])
            ref = torch.cat([ref, ref.new_zeros(pad, 2)])
        return {key: value[:rows] for key, value in _sweep(
            h, weight, bias, softcap, tgt, ref, k, vocab_chunk, token_chunk=token_chunk,
            compiled=True).items()}
    tc, v, work, dev = h.shape[0], weight.shape[0], h.dtype, h.device
    state = (torch.full((tc,), NEG, dtype=work, device=dev),  # m
             *(torch.zeros(tc, dtype=work, device=dev) for _ in range(3)),  # s, u, total
             torch.zeros(tc, dtype=work, device=dev),  # hit
             torch.zeros(tc, dtype=work, device=dev),  # count: other logits > hi
             torch.zeros(tc, dtype=work, device=dev))  # near: other logits > lo
    flat = None  # the eager step's two scratch tiles, made at its first tile
    best_v = torch.full((tc, k), -math.inf, dtype=work, device=dev)  # the running top-k
    best_i = torch.zeros(tc, k, dtype=torch.long, device=dev)
    full = compiled and tc == token_chunk
    band = []  # (rows, values): other logits inside their row's band, where a tile had any
    for v0 in range(0, v, vocab_chunk):
        v1 = min(v0 + vocab_chunk, v)
        logits = _tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], softcap)
        counted = state[5:7]  # count, near before this tile
        if full and v1 - v0 == vocab_chunk:  # v0 as a tensor: one compiled graph for all tiles
            *state, tile_max = compiled_step(tgt is not None)(
                logits, *state[:4], torch.tensor(v0, device=dev), tgt, ref, *state[4:])
        else:
            if flat is None:
                flat = torch.empty(2, tc * min(vocab_chunk, v), dtype=work, device=dev)
            scratch = tuple(b[:logits.numel()].view(logits.shape) for b in flat)
            *state, tile_max = _step(logits, *state[:4], v0, tgt, ref, *state[4:], scratch)
        if tgt is not None:
            _keep_band(band, logits, tgt, ref, state[5] - counted[0], state[6] - counted[1])
        best_v, best_i = _merge_topk(logits, best_v, best_i, tile_max, v0)
    if band:  # count the kept logits above the target's own value: the count is then exact
        rows, values = (torch.cat(x) for x in zip(*band))
        state[5] = state[5].index_add(0, rows, (values > state[4][rows]).to(work))
    return dict(zip(("m", "s", "u", "total", "hit", "count", "near", "best_v", "best_i"),
                    (*state, best_v, best_i)))


_COMPILED: dict[bool, object] = {}
COMPILE_SECONDS: dict[str, float] = {}  # first-use compile time per variant, this process
COMPILE_ENV = "TOKENPROBE_COMPILE"


COMPILE_AFTER = 4e9  # auto: logits of full tiles swept plainly before the step is compiled
_PLAIN_LOGITS = [0]  # logits of full tiles this process swept with the plain step, eligible


def compile_eligible(device: torch.device, work: torch.dtype, n_tokens: int,
                     token_chunk: int) -> bool:
    """The compiled step can serve this call: CPU, float32, at least one full token chunk."""
    return device.type == "cpu" and work == torch.float32 and n_tokens >= token_chunk


def compile_wanted(device: torch.device, work: torch.dtype, n_tokens: int,
                   token_chunk: int) -> bool:
    """Whether the torch path compiles its tile step: $TOKENPROBE_COMPILE "1" always, "0"
    never, else ("auto") for an eligible call once this process has swept `COMPILE_AFTER`
    logits of full tiles plainly (about 2,000 tiles of 512 x 4096, some 20 s of tile
    epilogues on a 2-core CPU, against a first compile of about 11 s): a short run never
    compiles, a long one pays the compile once, after it has shown it is long."""
    import os

    wanted = os.environ.get(COMPILE_ENV, "auto")
    if wanted in ("0", "1"):
        return wanted == "1"
    return (compile_eligible(device, work, n_tokens, token_chunk)
            and _PLAIN_LOGITS[0] >= COMPILE_AFTER)


def compiled_step(with_targets: bool):
    """`_step` through torch.compile (Inductor: fused, vectorised C++ on CPU), compiled once
    per process and variant for fixed tile shapes; the first call's time goes to
    `COMPILE_SECONDS`. If compiling fails (no C++ compiler), a warning, and the plain `_step`
    runs from then on."""
    if with_targets not in _COMPILED:
        compiled = torch.compile(_step, dynamic=False)

        def first(*args):
            import time
            import warnings

            start = time.perf_counter()
            try:
                out = compiled(*args)
            except Exception as err:  # noqa: BLE001 - any failure means: run the plain step
                warnings.warn(f"linear_entropy: torch.compile failed ({type(err).__name__}: "
                              f"{err}); the plain torch path runs", stacklevel=2)
                _COMPILED[with_targets] = _step
                return _step(*args)
            COMPILE_SECONDS["targets" if with_targets else "plain"] = time.perf_counter() - start
            _COMPILED[with_targets] = compiled
            return out

        _COMPILED[with_targets] = first
    return _COMPILED[with_targets]


def _chunked(hidden, weight, bias, softcap, targets, k, token_chunk, vocab_chunk, *,
             alone: bool = True):
    """Token chunks x vocabulary chunks, float32 (float64 for float64 inputs) tiles. With
    `alone`, tokens whose rank the estimate left unresolved are run again by themselves (all
    their statistics from that run, itself recounted in place); else their chunks are recounted
    against the tile values."""
    t, v, dev = hidden.shape[0], weight.shape[0], hidden.device
    work = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    out = {key: torch.empty(t, dtype=work, device=dev)
           for key in ("lse", "entropy", "self_certainty")}
    side = {"hit": torch.zeros(t, dtype=work, device=dev),  # target-rank bookkeeping
            "count": torch.zeros(t, dtype=torch.long, device=dev)}
    out["topk_ids"] = torch.empty(t, k, dtype=torch.long, device=dev)
    out["topk_probs"] = torch.empty(t, k, dtype=work, device=dev)
    if targets is not None:
        estimate = _target_estimate(hidden, weight, bias, softcap, targets, work, token_chunk)
        band = BAND * (estimate.abs() + 1)
        bounds = torch.stack([estimate - band, estimate + band], 1)  # (T, 2)
    compiled = compile_wanted(hidden.device, work, t, token_chunk)
    if not compiled and compile_eligible(hidden.device, work, t, token_chunk):
        _PLAIN_LOGITS[0] += (t // token_chunk) * token_chunk * (v // vocab_chunk) * vocab_chunk
    for a in range(0, t, token_chunk):
        b = min(a + token_chunk, t)
        tgt, ref = (targets[a:b], bounds[a:b]) if targets is not None else (None, None)
        acc = _sweep(hidden[a:b].to(work), weight, bias, softcap, tgt, ref, k, vocab_chunk,
                     token_chunk=token_chunk, compiled=compiled)
        log_s = acc["s"].log()
        lse = acc["m"] + log_s
        out["lse"][a:b], out["entropy"][a:b] = lse, log_s - acc["u"] / acc["s"]
        out["self_certainty"][a:b] = lse - acc["total"] / v - math.log(v)
        out["topk_ids"][a:b] = acc["best_i"]
        out["topk_probs"][a:b] = (acc["best_v"] - lse[:, None]).exp()
        for key, column in side.items():
            column[a:b] = acc[key]
    if targets is None:
        return out
    hit, count = side["hit"], side["count"]
    # exact when the tile's own value is in the band: the others above the band's top, plus
    # those kept from inside it that are above the value (`_keep_band`)
    lo, hi = bounds.unbind(1)
    bad = ((hit <= lo) | (hit > hi)) & (targets >= 0)  # the estimate missed its band
    if alone and bool(bad.any()):  # those tokens by themselves
        rows = bad.nonzero()[:, 0]
        again = _chunked(hidden[rows], weight, bias, softcap, targets[rows], k, token_chunk,
                         vocab_chunk, alone=False)
        out = out | _target_outputs(targets, hit, count, out["lse"])
        for key, value in again.items():
            out[key][rows] = value
        return out
    if bool(bad.any()):  # recount those blocks against the tile value
        exact = torch.where(targets >= 0, hit, estimate)[:, None].expand(-1, 2).contiguous()
        for a in range(0, t, token_chunk):
            b = min(a + token_chunk, t)
            if bool(bad[a:b].any()):  # the same tiles again, so the same bits
                count[a:b] = _sweep(hidden[a:b].to(work), weight, bias, softcap, targets[a:b],
                                    exact[a:b], k, vocab_chunk, token_chunk=token_chunk,
                                    compiled=compiled)["count"]
    return out | _target_outputs(targets, hit, count, out["lse"])


def _triton(*args):
    """The Triton launch (its own module, so this one imports without triton)."""
    from tokenprobe.kernels.linear_entropy_triton import launch

    return launch(*args)
