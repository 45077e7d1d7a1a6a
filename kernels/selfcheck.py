"""A fast path is trusted on a device only after it has been checked there.

First-use self-check: the first time a process is about to run a fast path (Triton, or the
attention op's "flash" path) of an op on a device, `trusted_impl` (called by
`common.resolve_impl` with the op's name) runs it once on a small seeded case (odd shapes,
padding, GQA, softcapping, targets) and compares it with impl="torch" on the same device within
the case's tolerance (`cases.TOL`, 1e-4). Pass: trusted for the rest of the process. Fail (or
an exception): one `SelfCheckWarning` naming the op, the device and the error, and "torch"
runs instead for the rest of the process. Off: `set_enabled(False)` or TOKENPROBE_SELFCHECK=0. `ran()` records what
each op ran since `reset_ran()` (the runner stores it in run.json as "kernels").

The cases and their errors are in kernels/cases.py; at the embedded models' shapes and against
the float64 reference they are what `tokenprobe selftest` runs (`selftest`).
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

from tokenprobe.kernels.cases import (MODELS, Case, attention_case, check_cases,
                                      linear_entropy_case, two_model_case)

FAST = {"attention_with_stats": ("flash", "triton"), "linear_entropy": ("triton",),
        "two_model_divergence": ("triton",)}  # op -> the implementations that are checked
ENV = "TOKENPROBE_SELFCHECK"


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
