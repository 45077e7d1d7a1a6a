"""kernels/common.py: the impl dispatch rule every op shares, and soft-capping."""
from __future__ import annotations

import importlib.util

import pytest
import torch

try:
    import triton
    import triton.language as tl

    from tokenprobe.kernels.triton_common import tanh_cap as tl_tanh_cap
except ImportError:  # pragma: no cover - triton is optional
    triton = None

from tokenprobe.kernels import common
from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.kernels.common import IMPLS, NO_TRITON, resolve_impl, tanh_cap
from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.two_model import two_model_divergence

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if triton is not None:
    @triton.jit
    def _cap_kernel(x_ptr, out_ptr, n, cap, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
        tl.store(out_ptr + i, tl_tanh_cap(x, cap), mask=i < n)


@pytest.fixture
def triton_present(monkeypatch):
    monkeypatch.setattr(common, "triton_available", lambda: True)


@pytest.fixture
def triton_absent(monkeypatch):
    monkeypatch.setattr(common, "triton_available", lambda: False)


def test_unknown_impl_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'torch', 'triton', "
                                         r"'reference'\), got 'cuda'"):
        resolve_impl("cuda", CPU)
    with pytest.raises(ValueError, match="'flash'"):
        resolve_impl("cuda", CPU, allowed=IMPLS + ("flash",))
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("flash", CPU)  # not allowed unless the op says so


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_named_impls_pass_through(impl, triton_present):
    assert resolve_impl(impl, CUDA) == impl


def test_auto_on_cpu_is_the_fallback(triton_present, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never picked by "auto"
    assert resolve_impl("auto", CPU) == "torch"
    assert resolve_impl("auto", CPU, fallback="flash") == "flash"


def test_auto_on_cuda_takes_triton_only_where_it_imports_and_fits(monkeypatch):
    monkeypatch.setattr(common, "triton_available", lambda: True)
    assert resolve_impl("auto", CUDA) == "triton"
    assert resolve_impl("auto", CUDA, unfit="no float64", fallback="flash") == "flash"
    monkeypatch.setattr(common, "triton_available", lambda: False)
    assert resolve_impl("auto", CUDA) == "torch"


def test_triton_asked_for_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(common, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=NO_TRITON):
        resolve_impl("triton", CUDA)
    monkeypatch.setattr(common, "triton_available", lambda: True)
    assert resolve_impl("triton", CUDA) == "triton"
    with pytest.raises(ValueError, match="^the op's reason$"):
        resolve_impl("triton", CUDA, unfit="the op's reason")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", CPU) == "triton"
    with pytest.raises(ValueError, match="got meta"):
        resolve_impl("triton", torch.device("meta"))


def test_ops_use_the_shared_rule(triton_absent):
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=NO_TRITON):
        linear_entropy(h, w, impl="triton")
    with pytest.raises(ValueError, match=NO_TRITON):
        two_model_divergence(h, w, h, w, impl="triton")
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=NO_TRITON):
        attention_with_stats(q, q, q, None, torch.tensor([3]), scaling=0.5, impl="triton")
    torch.testing.assert_close(linear_entropy(h, w, impl="auto")["lse"],
                               linear_entropy(h, w, impl="torch")["lse"], rtol=0, atol=0)


def test_triton_available_says_whether_it_imports():
    assert common.triton_available() is (importlib.util.find_spec("triton") is not None)


def test_tanh_cap():
    x = torch.linspace(-50, 50, 101)
    assert tanh_cap(x, None) is x
    capped = tanh_cap(x, 5.0)
    torch.testing.assert_close(capped, 5.0 * torch.tanh(x / 5.0))
    assert capped.abs().max() <= 5.0 and torch.equal(tanh_cap(x[:1] * 0, 5.0), x[:1] * 0)
    y = x.clone()
    assert tanh_cap(y, 5.0, inplace=True) is y and torch.equal(y, capped)  # bitwise the same


@pytest.mark.skipif(triton is None or not common.triton_runs_on(TRITON_DEVICE),
                    reason="needs triton, and CUDA or TRITON_INTERPRET=1")
def test_triton_tanh_cap_matches_torch():
    x = torch.linspace(-50, 50, 101, device=TRITON_DEVICE)
    out = torch.empty_like(x)
    _cap_kernel[(1,)](x, out, x.numel(), 5.0, BLOCK=128)
    torch.testing.assert_close(out, 5.0 * torch.tanh(x / 5.0), rtol=1e-5, atol=1e-5)
