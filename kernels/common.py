"""What every kernel op shares: the implementation names and the rule that picks one (with the
first-use self-check of kernels/selfcheck.py), whether Triton imports and runs on a device, and
logit soft-capping (the Triton side of it lives in kernels/triton_common.py, which needs
triton)."""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

IMPLS = ("auto", "torch", "triton", "reference")
NO_TRITON = "impl='triton' needs triton, which does not import here"
NO_FLOAT64 = "impl='triton' takes float16, bfloat16 or float32 inputs, not float64"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports; tried on first use, so that TRITON_INTERPRET may be set later."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels take tensors on `device`: CUDA, or CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu"
                                     and os.environ.get("TRITON_INTERPRET") == "1")


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    """Raise ValueError unless `impl` is one of `allowed`."""
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device, *, allowed: tuple[str, ...] = IMPLS,
                 unfit: str | None = None, fallback: str = "torch", op: str | None = None) -> str:
    """The implementation to run. "auto" is "triton" on CUDA where triton imports and the op's
    Triton path takes the inputs (`unfit` is None), else `fallback`; "triton" asked for raises
    ValueError where it cannot run (`unfit` is the op's own message); others pass through.
    With `op` (the op's name) the result goes through `selfcheck.trusted_impl`: a fast path
    not yet trusted on `device` is checked first, "torch" replaces one that failed, and what
    ran is recorded."""
    check_impl(impl, allowed)
    if impl == "triton":
        if not triton_available():
            raise ValueError(NO_TRITON)
        if unfit is not None:
            raise ValueError(unfit)
        if not triton_runs_on(device):
            raise ValueError(f"impl='triton' needs CUDA tensors, or CPU tensors with "
                             f"TRITON_INTERPRET=1 set before triton is imported; got "
                             f"{device.type}")
    if impl == "auto":
        impl = ("triton" if device.type == "cuda" and unfit is None and triton_available()
                else fallback)
    if op is None:
        return impl
    from tokenprobe.kernels.selfcheck import trusted_impl  # it imports the ops, which import this

    return trusted_impl(op, impl, device)


def tanh_cap(x: Tensor, cap: float | None, *, inplace: bool = False) -> Tensor:
    """cap tanh(x / cap) (Gemma 2's soft-capping), x itself for cap None; `inplace` overwrites x
    (a logit tile: no second buffer of its size)."""
    if cap is None:
        return x
    if inplace:
        return x.div_(cap).tanh_().mul_(cap)
    return torch.tanh(x / cap) * cap
