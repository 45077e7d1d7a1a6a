"""The cases the kernel self-checks run: seeded inputs of each op that exercise its features
(odd shapes, padding, GQA, soft-capping, targets), the embedded models' shapes, and the errors
they are judged by.

`check_cases` are the first-use checks of kernels/selfcheck.py (small, float32, more than one
block or tile in every direction); `attention_case`, `linear_entropy_case` and
`two_model_case` build the larger ones of `tokenprobe selftest`. Errors are
max |got - want| / (1 + |want|) (`max_error`: within tol exactly where the tests'
assert_close with rtol = atol = tol passes); top-k ids and target ranks are compared through
the float64 logits they point at, so near-ties at rounding level are not failures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.kernels.common import tanh_cap
from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.two_model import two_model_divergence

TOL = 1e-4  # the tests' float32 tolerance


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    vocab: int


# The embedded models' shapes (tokenprobe.models.describe gives all but the head dim).
MODELS = {"smollm2-135m": Shape(9, 3, 64, 576, 49152), "gemma3-270m": Shape(4, 1, 256, 640, 262144)}


# ----------------------------------------------------------------------------- comparisons

def max_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / (1 + |want|) in float64 (<= tol exactly where assert_close with rtol =
    atol = tol passes); inf where their shapes or NaN positions differ; 0 when empty."""
    if got.shape != want.shape:
        return math.inf
    g, w = got.detach().double(), want.detach().double()
    if not torch.equal(g.isnan(), w.isnan()):
        return math.inf
    if g.numel() == 0:
        return 0.0
    err = ((g - w).abs() / (1 + w.abs())).nan_to_num(0.0, posinf=math.inf)
    return float(err.max())


def ids_error(ids: Tensor, want_ids: Tensor, logits64: Tensor) -> float:
    """`max_error` of the float64 logits the top-k ids point at (ties and near-ties pass);
    inf for ids out of range or repeated in a row."""
    if ids.shape != want_ids.shape:
        return math.inf
    ids = ids.to(logits64.device).long()
    if ids.numel() and (bool(((ids < 0) | (ids >= logits64.shape[1])).any())
                        or bool((ids.sort(1).values.diff(dim=1) == 0).any())):
        return math.inf
    return max_error(logits64.gather(1, ids), logits64.gather(1, want_ids.to(ids.device).long()))


def rank_error(rank: Tensor, targets: Tensor, logits64: Tensor) -> float:
    """How far a rank's logit is from the target's: max over tokens of |l_(r) - l_t| / (1 + |l_t|)
    with l_(r) the r-th largest float64 logit (0 for an exact rank; the gap of the near-tie a
    rank is off by one across); inf for a rank out of [1, V], or not 0 where there is no target."""
    rank, targets = rank.to(logits64.device).long(), targets.to(logits64.device).long()
    has = targets >= 0
    if rank.shape != targets.shape or bool((rank[~has] != 0).any()):
        return math.inf
    if not bool(has.any()):
        return 0.0
    r, z, t = rank[has], logits64[has], targets[has]
    if bool(((r < 1) | (r > z.shape[1])).any()):
        return math.inf
    lt = z.gather(1, t[:, None])[:, 0]
    at = z.sort(dim=1, descending=True).values.gather(1, (r - 1)[:, None])[:, 0]
    return float(((at - lt).abs() / (1 + lt.abs())).max())


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One input of one op: `run(impl)` calls the op on it, `errors(got, want)` gives the worst
    error per output."""
    op: str
    label: str
    dtype: torch.dtype
    tol: float
    impls: tuple[str, ...]  # compared against the reference by `selftest`
    run: Callable[[str], Any]
    errors: Callable[[Any, Any], dict[str, float]]


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def attention_inputs(heads: int, kv_heads: int, t: int, head_dim: int, dtype: torch.dtype,
                     lengths: list[int], device, seed: int = 0) -> list[Tensor]:
    """q (B, H, T, Dh), k and v (B, KVH, T, Dh) with a strong first key (as sinks make), the
    causal + right-padding bool mask (B, 1, T, T) and the lengths (B,), on `device`."""
    g = torch.Generator().manual_seed(seed)
    q = _randn(g, len(lengths), heads, t, head_dim) * 2
    k = _randn(g, len(lengths), kv_heads, t, head_dim) * 2
    v = _randn(g, len(lengths), kv_heads, t, head_dim)
    k[:, :, 0] *= 4
    i = torch.arange(t)
    mask = ((i[None, :] <= i[:, None])[None, None]
            & (i[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :])
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [
        mask.to(device), torch.tensor(lengths, device=device)]


def attention_case(label: str, heads: int, kv_heads: int, head_dim: int, t: int,
                   dtype: torch.dtype, device, *, lengths: list[int] | None = None,
                   softcap: float | None = None, k_pos: int = 0, block: int = 256,
                   seed: int = 0) -> Case:
    """`attention_with_stats` on random inputs; outputs compared at real queries only."""
    lengths = lengths or [t, max(1, t - t // 3)]
    q, k, v, mask, lens = attention_inputs(heads, kv_heads, t, head_dim, dtype, lengths, device,
                                           seed)
    kw = {"scaling": head_dim ** -0.5, "softcap": softcap, "k_pos": k_pos, "block": block}
    real = torch.arange(t, device=lens.device)[None, :] < lens[:, None]  # (B, T)

    def errors(got, want) -> dict[str, float]:
        (out, stats), (ref_out, ref) = got, want
        return {"out": max_error(out[real], ref_out[real]),
                **{n: max_error(stats[n], ref[n]) for n in ("sink_mass", "attn_entropy",
                                                            "received")}}

    return Case("attention_with_stats", label, dtype, 2e-2 if dtype != torch.float32 else TOL,
                ("torch", "flash", "triton"),
                lambda impl: attention_with_stats(q, k, v, mask, lens, impl=impl, **kw), errors)


def _targets(g: torch.Generator, t: int, v: int) -> Tensor:
    targets = torch.randint(0, v, (t,), generator=g)
    targets[3::4] = -1
    targets[1::8] = -100  # rows without a target
    return targets


def _logits64(h: Tensor, w: Tensor, b: Tensor | None, cap: float | None) -> Tensor:
    z = h.double() @ w.double().T
    return tanh_cap(z + b.double() if b is not None else z, cap)


def linear_entropy_case(label: str, t: int, v: int, d: int, dtype: torch.dtype, device, *,
                        bias: bool = False, softcap: float | None = None, topk: int = 2,
                        seed: int = 0, **chunks: int) -> Case:
    """`linear_entropy` with targets (some rows without) on logits of std about 4."""
    g = torch.Generator().manual_seed(seed)
    hidden = (_randn(g, t, d) * 2).to(device=device, dtype=dtype)
    weight = (_randn(g, v, d) * (2 / math.sqrt(d))).to(device=device, dtype=dtype)
    b = _randn(g, v).to(device=device, dtype=dtype) if bias else None
    targets = _targets(g, t, v).to(device)
    logits: list[Tensor] = []  # float64, built once when first compared

    def errors(got, want) -> dict[str, float]:
        if not logits:
            logits.append(_logits64(hidden, weight, b, softcap))
        out = {n: max_error(got[n], want[n]) for n in
               ("lse", "entropy", "self_certainty", "topk_probs", "target_logprob")}
        return out | {"topk_ids": ids_error(got["topk_ids"], want["topk_ids"], logits[0]),
                      "target_rank": rank_error(got["target_rank"], targets, logits[0])}

    return Case("linear_entropy", label, dtype, TOL, ("torch", "triton"),
                lambda impl: linear_entropy(hidden, weight, bias=b, softcap=softcap,
                                            targets=targets, topk=topk, impl=impl, **chunks),
                errors)


def two_model_case(label: str, t: int, v: int, dp: int, dq: int, dtype: torch.dtype, device, *,
                   shared: bool = False, bias_p: bool = False, softcap_p: float | None = None,
                   softcap_q: float | None = None, contrast_beta: float | None = None,
                   jsd: bool = True, targets: bool = True, seed: int = 0,
                   **chunks: int) -> Case:
    """`two_model_divergence`: two models over one vocabulary, or with `shared` the logit lens
    (one weight, bias and softcap for both token sets; dq is dp)."""
    g = torch.Generator().manual_seed(seed)
    dq = dp if shared else dq
    hp = (_randn(g, t, dp) * 2).to(device=device, dtype=dtype)
    wp = (_randn(g, v, dp) * (2 / math.sqrt(dp))).to(device=device, dtype=dtype)
    hq = (_randn(g, t, dq) * 2).to(device=device, dtype=dtype)
    wq = wp if shared else (_randn(g, v, dq) * (2 / math.sqrt(dq))).to(device=device, dtype=dtype)
    bp = _randn(g, v).to(device=device, dtype=dtype) if bias_p else None
    kw = {"bias_p": bp, "bias_q": bp if shared else None, "softcap_p": softcap_p,
          "softcap_q": softcap_p if shared else softcap_q, "contrast_beta": contrast_beta,
          "targets": _targets(g, t, v).to(device) if targets or contrast_beta else None,
          "jsd": jsd}

    def errors(got, want) -> dict[str, float]:
        return {n: max_error(got[n], want[n]) if n in got else math.inf for n in want}

    return Case("two_model_divergence", label, dtype, TOL, ("torch", "triton"),
                lambda impl: two_model_divergence(hp, wp, hq, wq, impl=impl, **kw, **chunks),
                errors)


def check_cases(op: str, impl: str, device) -> list[Case]:
    """The first-use check of `impl` of `op`: small seeded float32 cases with more than one
    block or tile of the kernel in every direction."""
    f32 = torch.float32
    if op == "attention_with_stats":  # GQA 2, T = 37 over two query blocks, padding, Dh 24
        base = {"heads": 4, "kv_heads": 2, "head_dim": 24, "t": 37, "dtype": f32,
                "device": device, "lengths": [37, 21], "k_pos": 1, "block": 16}
        cases = [attention_case("B=2 H=4 KVH=2 T=37 Dh=24", **base)]
        if impl != "flash":  # flash takes no softcapping
            cases.append(attention_case("B=2 H=4 KVH=2 T=37 Dh=24 softcap=5", softcap=5.0,
                                        **base))
        return cases
    chunks = {"token_chunk": 16, "vocab_chunk": 64}
    if op == "linear_entropy":
        return [linear_entropy_case("T=19 V=203 D=72 bias softcap=10 topk=3", 19, 203, 72, f32,
                                    device, bias=True, softcap=10.0, topk=3, **chunks)]
    if op == "two_model_divergence":
        return [two_model_case("T=19 V=203 Dp=72 Dq=40", 19, 203, 72, 40, f32, device,
                               bias_p=True, softcap_q=4.0, contrast_beta=0.5, **chunks),
                two_model_case("T=19 V=203 D=72 lens", 19, 203, 72, 72, f32, device,
                               shared=True, bias_p=True, softcap_p=6.0, jsd=False, **chunks)]
    raise ValueError(f"no self-check for op {op!r}")
