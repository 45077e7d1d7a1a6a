"""A fast path is trusted on a device only after it has been checked there.

First-use self-check: the first time a process is about to run a fast path (Triton, or the
attention op's "flash" path) of an op on a device, `trusted_impl` (called by
`common.resolve_impl` with the op's name) runs it once on a small seeded case (odd shapes,
padding, GQA, softcapping, targets) and compares it with impl="torch" on the same device within
`TOL`. Pass: trusted for the rest of the process. Fail (or an exception): one
`SelfCheckWarning` naming the op, the device and the error, and "torch" runs instead for the
rest of the process. Off: `set_enabled(False)` or TOKENPROBE_SELFCHECK=0. `ran()` records what
each op ran since `reset_ran()` (the runner stores it in run.json as "kernels").

The same cases, at the embedded models' shapes and against the float64 reference, are what
`tokenprobe selftest` runs (`selftest`); benchmarks/gpu_check.py reuses the attention ones.
Errors are max |got - want| / (1 + |want|) (`max_error`: within tol exactly where the tests'
assert_close with rtol = atol = tol passes); top-k ids and target ranks are compared through the
float64 logits they point at, so near-ties at rounding level are not failures.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.kernels.common import tanh_cap
from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.two_model import two_model_divergence

FAST = {"attention_with_stats": ("flash", "triton"), "linear_entropy": ("triton",),
        "two_model_divergence": ("triton",)}  # op -> the implementations that are checked
TOL = 1e-4  # the tests' float32 tolerance
ENV = "TOKENPROBE_SELFCHECK"


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    width: int
    vocab: int


# The embedded models' shapes (tokenprobe.models.describe gives all but the head dim).
MODELS = {"smollm2-135m": Shape(9, 3, 64, 576, 49152), "gemma3-270m": Shape(4, 1, 256, 640, 262144)}


class SelfCheckWarning(UserWarning):
    """A fast kernel path failed its first-use self-check; impl="torch" runs instead."""


_enabled = True
_lock = threading.RLock()
_trust: dict[tuple[str, str, str], str | None] = {}  # (op, impl, device) -> None or the error
_ran: dict[str, dict] = {}
_bypass: contextvars.ContextVar[bool] = contextvars.ContextVar("tokenprobe_selfcheck_bypass",
                                                               default=False)


def set_enabled(on: bool) -> None:
    """Switch the first-use self-check on or off for this process."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether the self-check runs: on unless `set_enabled(False)` or TOKENPROBE_SELFCHECK=0."""
    return _enabled and os.environ.get(ENV, "1") != "0"


def ran() -> dict[str, dict]:
    """{op: {"impl", "checked", "passed", "error"}} since `reset_ran()`; "impl" joins with "+"
    the implementations that ran (e.g. "flash+torch" where some layers' masks were not causal),
    "passed" is None where nothing was checked."""
    with _lock:
        return copy.deepcopy(_ran)


def reset_ran() -> None:
    """Forget what `ran()` recorded (the trust cache stays)."""
    with _lock:
        _ran.clear()


def reset() -> None:
    """Forget every check and record and switch the self-check on again (tests)."""
    global _enabled
    with _lock:
        _trust.clear()
        _ran.clear()
        _enabled = True


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Ops called inside run the implementation asked for, unchecked and unrecorded (the
    checks themselves, `selftest`, benchmarks/gpu_check.py)."""
    token = _bypass.set(True)
    try:
        yield
    finally:
        _bypass.reset(token)


@functools.cache
def _cuda_name(index: int) -> str:
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def device_name(device: torch.device | str) -> str:
    """"cpu", or "cuda:N (its name)": the device part of the trust cache's key."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return str(device)


def trusted_impl(op: str, impl: str, device: torch.device) -> str:
    """The implementation to run where `impl` was resolved: `impl` itself, or "torch" where it
    is a fast path that failed its check on `device` (run here at first use, warned once)."""
    if _bypass.get():
        return impl
    checked, error = False, None
    if impl in FAST.get(op, ()) and enabled():
        key, fresh = (op, impl, device_name(device)), False
        with _lock:
            if key not in _trust:
                _trust[key], fresh = _check(op, impl, torch.device(device)), True
            error, checked = _trust[key], True
        if error is not None and fresh:
            warnings.warn(SelfCheckWarning(
                f"self-check of {op} impl='{impl}' failed on {key[2]}: {error}; using "
                "impl='torch' for the rest of this process"),
                stacklevel=5)  # past resolve_impl, the op and its torch.no_grad wrapper
    use = "torch" if error is not None else impl
    _record(op, use, checked, None if not checked else error is None, error)
    return use


def _record(op: str, impl: str, checked: bool, passed: bool | None, error: str | None) -> None:
    with _lock:
        entry = _ran.get(op)
        if entry is None:
            _ran[op] = {"impl": impl, "checked": checked, "passed": passed, "error": error}
            return
        if impl not in entry["impl"].split("+"):
            entry["impl"] += f"+{impl}"
        entry["checked"] |= checked
        if passed is not None:
            entry["passed"] = passed and entry["passed"] is not False
        entry["error"] = entry["error"] or error


def _check(op: str, impl: str, device: torch.device) -> str | None:
    """None if `impl` matches impl="torch" on every check case of `op` on `device`, else why."""
    try:
        with unchecked():
            for case in check_cases(op, impl, device):
                want, got = case.run("torch"), case.run(impl)
                errors = case.errors(got, want)
                name = max(errors, key=lambda n: _key(errors[n]))
                if not errors[name] <= case.tol:
                    return (f"{name} differs from impl='torch' by {errors[name]:.3g} "
                            f"(tolerance {case.tol:g}) on {case.label}")
    except Exception as err:  # a kernel that does not compile or launch here
        return " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return None


def _key(x: float) -> float:
    return math.inf if math.isnan(x) else x


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


# ----------------------------------------------------------------------------- selftest

def selftest_cases(device, *, full: bool = False,
                   ops: tuple[str, ...] | None = None) -> Iterator[Case]:
    """Every op (or those in `ops`) at each embedded model's shapes: T = 13 and a vocabulary
    cut to 4099 in float32; `full` adds bfloat16 and T = 1024 (attention) or 512 (the whole
    vocabulary). Each case's inputs are built when it is reached."""
    att, ent, two = (op if not ops or op in ops else None for op in FAST)
    for name, s in MODELS.items():
        cut = min(4099, s.vocab)
        for dtype in (torch.float32, torch.bfloat16) if full else (torch.float32,):
            for softcap, k_pos in ((None, 0), (30.0, 2)) if att else ():
                extra = f" softcap={softcap:g} k_pos={k_pos}" if softcap else ""
                yield attention_case(f"{name} T=13{extra}", s.heads, s.kv_heads, s.head_dim, 13,
                                     dtype, device, softcap=softcap, k_pos=k_pos)
            if ent:
                yield linear_entropy_case(f"{name} T=13 V={cut} softcap=30", 13, cut, s.width,
                                          dtype, device, softcap=30.0, topk=4)
            if two:
                yield two_model_case(f"{name} T=13 V={cut} softcap_q=30", 13, cut, s.width,
                                     s.width, dtype, device, softcap_q=30.0, contrast_beta=1.0)
                yield two_model_case(f"{name} T=13 V={cut} lens", 13, cut, s.width, s.width,
                                     dtype, device, shared=True, jsd=False, targets=False)
            if not full:
                continue
            for softcap, k_pos in ((None, 0), (None, 2), (30.0, 0)) if att else ():
                yield attention_case(f"{name} T=1024 softcap={softcap} k_pos={k_pos}", s.heads,
                                     s.kv_heads, s.head_dim, 1024, dtype, device,
                                     softcap=softcap, k_pos=k_pos)
            if ent:
                yield linear_entropy_case(f"{name} T=512 V={s.vocab}", 512, s.vocab, s.width,
                                          dtype, device)
            if two:
                yield two_model_case(f"{name} T=512 V={s.vocab}", 512, s.vocab, s.width,
                                     s.width, dtype, device, contrast_beta=1.0)
                yield two_model_case(f"{name} T=512 V={s.vocab} lens", 512, s.vocab, s.width,
                                     s.width, dtype, device, shared=True, jsd=False,
                                     targets=False)


@dataclass
class Row:
    """One implementation on one case: status "ok", "FAIL" or "skipped" (`note` says why, or
    which output failed); time per call and its ratio to impl="torch" on the same case."""
    op: str
    case: str
    impl: str
    dtype: str
    status: str
    error: float | None = None
    tol: float | None = None
    time_s: float | None = None
    x_torch: float | None = None
    note: str = ""


def time_call(fn: Callable[[], Any], device, repeats: int, warmup: bool = True) -> float:
    """Median seconds per call of `fn` over `repeats` calls, after one untimed call (`warmup`)."""
    cuda = torch.device(device).type == "cuda"
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_impl_on(case: Case, impl: str, want: Any, device, repeats: int = 1) -> Row:
    """`impl` on `case` against `want` (the reference's result), then timed over `repeats`
    calls (the first call was the warm-up; 0: not timed)."""
    row = Row(case.op, case.label, impl, str(case.dtype).split(".")[-1], "ok", tol=case.tol)
    try:
        got = case.run(impl)
    except ValueError as err:  # the op says the implementation does not apply here
        if not str(err).startswith(f"impl='{impl}'"):
            raise
        row.status, row.note = "skipped", str(err).split("; use ")[0]
        return row
    errors = case.errors(got, want)
    worst = max(errors, key=lambda n: _key(errors[n]))
    row.error = errors[worst]
    if not row.error <= case.tol:
        row.status, row.note = "FAIL", f"worst: {worst}"
    del got
    if repeats > 0:
        row.time_s = time_call(lambda: case.run(impl), device, repeats, warmup=False)
    return row


def selftest(device, *, full: bool = False, repeats: int = 1,
             ops: tuple[str, ...] | None = None) -> Iterator[Row]:
    """Every implementation of every op (or of `ops`) on `selftest_cases` against
    impl="reference" (float64), row by row, unchecked; an exception in an implementation is a
    FAIL row naming it."""
    with unchecked():
        for case in selftest_cases(device, full=full, ops=ops):
            want, base = case.run("reference"), None
            for impl in case.impls:
                try:
                    row = check_impl_on(case, impl, want, device, repeats)
                except Exception as err:
                    row = Row(case.op, case.label, impl, str(case.dtype).split(".")[-1], "FAIL",
                              tol=case.tol, note=" ".join(f"{type(err).__name__}: {err}"
                                                          .split())[:200])
                if impl == "torch":
                    base = row.time_s
                if row.time_s is not None and base:
                    row.x_torch = row.time_s / base
                yield row
            del want
