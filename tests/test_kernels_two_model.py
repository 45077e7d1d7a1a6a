"""two_model_divergence: chunked torch and Triton paths against an independent float64 oracle."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from torch.overrides import TorchFunctionMode

from tokenprobe.kernels.two_model import two_model_divergence

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
# Triton runs on CUDA when there is one, else in its interpreter (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, V, Dp, Dq) with (token_chunk, vocab_chunk) tiles that do not divide them
SWEEP = [((41, 401, 37, 20), (16, 128)), ((41, 401, 37, 20), (5, 97)),
         ((7, 1271, 16, 16), (3, 300)), ((7, 1271, 16, 16), (16, 128)),
         ((1, 3, 5, 5), (1, 2)), ((1, 3, 5, 5), (4, 16)),
         ((130, 999, 64, 48), (48, 256)), ((130, 999, 64, 48), (29, 320))]
KEYS = ("lse_p", "lse_q", "entropy_p", "entropy_q", "kl_pq", "kl_qp", "jsd")
TARGET_KEYS = ("target_logprob_p", "target_logprob_q", "contrast_logprob")


def make_inputs(t, v, dp, dq, dtype=torch.float32, *, bias=False, seed=0, scale=1.0):
    """Hidden states and unembeddings of two models; bias (if asked) on p only, and targets
    with some negative (skipped) entries."""
    g = torch.Generator().manual_seed(seed)
    hp, hq = torch.randn(t, dp, generator=g), torch.randn(t, dq, generator=g)
    wp = torch.randn(v, dp, generator=g) * scale / math.sqrt(dp) * 3
    wq = torch.randn(v, dq, generator=g) * scale / math.sqrt(dq) * 3
    bp = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (t,), generator=g)
    targets[::5] = -100
    hp, wp, hq, wq = (x.to(dtype) for x in (hp, wp, hq, wq))
    return hp, wp, hq, wq, bp, targets


def oracle(hp, wp, hq, wq, *, bias_p=None, bias_q=None, softcap_p=None, softcap_q=None,
           targets=None, beta=None):
    """Textbook float64 formulas over the full (T, V) logits, no code shared with the kernel."""
    def logits(h, w, b, cap):
        z = h.double() @ w.double().T
        if b is not None:
            z = z + b.double()
        return cap * torch.tanh(z / cap) if cap is not None else z

    zp, zq = logits(hp, wp, bias_p, softcap_p), logits(hq, wq, bias_q, softcap_q)
    p, q = Categorical(logits=zp), Categorical(logits=zq)
    m = Categorical(probs=(p.probs + q.probs) / 2)
    out = {"lse_p": torch.logsumexp(zp, -1), "lse_q": torch.logsumexp(zq, -1),
           "entropy_p": p.entropy(), "entropy_q": q.entropy(),
           "kl_pq": kl_divergence(p, q), "kl_qp": kl_divergence(q, p),
           "jsd": 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)}
    if targets is not None:
        y, nan = targets.clamp_min(0)[:, None], torch.tensor(math.nan, dtype=torch.float64)
        lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
        out["target_logprob_p"] = torch.where(targets >= 0, lp.gather(1, y)[:, 0], nan)
        out["target_logprob_q"] = torch.where(targets >= 0, lq.gather(1, y)[:, 0], nan)
        if beta is not None:
            lc = torch.log_softmax((1 + beta) * zp - beta * zq, -1)
            out["contrast_logprob"] = torch.where(targets >= 0, lc.gather(1, y)[:, 0], nan)
    return out


def assert_matches(got, want, tol, keys=None):
    for k in keys or want:
        torch.testing.assert_close(got[k].double().cpu(), want[k], rtol=tol, atol=tol,
                                   equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("shape,chunks", SWEEP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["p", "q"])  # bias and softcap on one side only
def test_torch_matches_oracle(shape, chunks, dtype, side):
    hp, wp, hq, wq, bias, targets = make_inputs(*shape, dtype, bias=True)
    kw = {f"bias_{side}": bias, f"softcap_{side}": 4.0}
    got = two_model_divergence(hp, wp, hq, wq, targets=targets, contrast_beta=1.0, impl="torch",
                               token_chunk=chunks[0], vocab_chunk=chunks[1], **kw)
    want = oracle(hp, wp, hq, wq, targets=targets, beta=1.0, **kw)
    assert set(got) == set(KEYS + TARGET_KEYS)
    assert all(x.dtype == torch.float32 and x.shape == (shape[0],) for x in got.values())
    assert_matches(got, want, 1e-4)


@needs_triton
@pytest.mark.parametrize("shape", [(41, 401, 37, 20), (1, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_oracle(shape, dtype):
    hp, wp, hq, wq, bias, targets = make_inputs(*shape, dtype, bias=True)
    kw = dict(bias_p=bias, softcap_q=4.0)
    args = [x.to(TRITON_DEVICE) for x in (hp, wp, hq, wq)]
    got = two_model_divergence(*args, bias_p=bias.to(TRITON_DEVICE), softcap_q=4.0,
                               targets=targets.to(TRITON_DEVICE), contrast_beta=0.5,
                               impl="triton", token_chunk=16, vocab_chunk=128)
    assert_matches(got, oracle(hp, wp, hq, wq, targets=targets, beta=0.5, **kw), 1e-4)


def test_reference_impl_matches_oracle_in_float64():
    hp, wp, hq, wq, bias, targets = make_inputs(41, 401, 37, 20, bias=True)
    kw = dict(bias_p=bias, softcap_q=4.0, targets=targets)
    got = two_model_divergence(hp, wp, hq, wq, impl="reference", contrast_beta=2.0, **kw)
    assert all(x.dtype == torch.float64 for x in got.values())
    want = oracle(hp, wp, hq, wq, bias_p=bias, softcap_q=4.0, targets=targets, beta=2.0)
    assert_matches(got, want, 1e-10)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_properties_kl_nonnegative_jsd_symmetric_and_bounded(impl):
    hp, wp, hq, wq, _, _ = make_inputs(41, 401, 37, 20)
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    hp, wp, hq, wq = (x.to(dev) for x in (hp, wp, hq, wq))
    kw = dict(impl=impl, token_chunk=16, vocab_chunk=128)
    fwd = two_model_divergence(hp, wp, hq, wq, **kw)
    rev = two_model_divergence(hq, wq, hp, wp, **kw)
    assert (fwd["kl_pq"] >= 0).all() and (fwd["kl_qp"] >= 0).all()
    assert (fwd["jsd"] >= 0).all() and (fwd["jsd"] <= math.log(2)).all()
    assert (fwd["entropy_p"] >= 0).all() and (fwd["entropy_p"] <= math.log(401) + 1e-5).all()
    torch.testing.assert_close(fwd["jsd"], rev["jsd"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fwd["kl_pq"], rev["kl_qp"], rtol=0, atol=1e-6)
    assert "jsd" not in two_model_divergence(hp, wp, hq, wq, jsd=False, **kw)
    for w2 in (wp, wp.clone()):  # shared-weight path and separate path
        same = two_model_divergence(hp, wp, hp.clone(), w2, **kw)
        for k in ("kl_pq", "kl_qp", "jsd"):
            assert same[k].abs().max().item() <= 1e-6, k


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_shared_weight_path_equals_separate_path(impl):
    """Logit lens: one unembedding (with bias and softcap) for the lens and final states."""
    hp, wp, _, _, bias, targets = make_inputs(41, 401, 37, 37, bias=True)
    hq = torch.randn(41, 37, generator=torch.Generator().manual_seed(1))
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    hp, wp, hq, bias, targets = (x.to(dev) for x in (hp, wp, hq, bias, targets))
    kw = dict(softcap_p=6.0, softcap_q=6.0, targets=targets, contrast_beta=1.0, impl=impl,
              token_chunk=16, vocab_chunk=128)
    fast = two_model_divergence(hp, wp, hq, wp, bias_p=bias, bias_q=bias, **kw)
    slow = two_model_divergence(hp, wp, hq, wp.clone(), bias_p=bias, bias_q=bias.clone(), **kw)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-5, equal_nan=True)
    want = oracle(hp.cpu(), wp.cpu(), hq.cpu(), wp.cpu(), bias_p=bias.cpu(), bias_q=bias.cpu(),
                  softcap_p=6.0, softcap_q=6.0, targets=targets.cpu(), beta=1.0)
    assert_matches(fast, want, 1e-4)


class CountMatmuls(TorchFunctionMode):
    """Counts torch matmul calls inside the block."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm")
        return func(*args, **(kwargs or {}))


def test_shared_weight_path_costs_one_matmul_per_tile():
    hp, wp, _, _, _, _ = make_inputs(41, 401, 8, 8)
    hq = hp.flip(0)
    counts = []
    for w2 in (wp, wp.clone()):
        with CountMatmuls() as c:
            two_model_divergence(hp, wp, hq, w2, impl="torch", token_chunk=16, vocab_chunk=128)
        counts.append(c.n)
    assert counts == [2 * 3 * 4, 2 * 2 * 3 * 4]  # 2 passes x 3 x 4 tiles, x 2 models if separate


def test_contrast_beta_one_is_the_explicit_cdpo_formula():
    hp, wp, hq, wq, _, targets = make_inputs(7, 1271, 16, 16)
    got = two_model_divergence(hp, wp, hq, wq, targets=targets, contrast_beta=1.0, impl="torch",
                               token_chunk=4, vocab_chunk=400)
    zp, zq = hp.double() @ wp.double().T, hq.double() @ wq.double().T
    for i, y in enumerate(targets.tolist()):
        if y < 0:
            for k in TARGET_KEYS:
                assert math.isnan(got[k][i].item())
            continue
        s = torch.softmax(2 * zp[i] - zq[i], -1)[y].item()  # s_t = softmax(2 z_pos - z_neg)[y_t]
        assert math.exp(got["contrast_logprob"][i].item()) == pytest.approx(s, rel=1e-4)
        assert got["target_logprob_p"][i].item() == pytest.approx(
            torch.log_softmax(zp[i], -1)[y].item(), abs=1e-4)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_error_no_worse_than_plain_torch(impl):
    """ml-cross-entropy's rule: against fp64 truth, the fast path may not lose to plain torch."""
    hp, wp, hq, wq, _, targets = make_inputs(41, 401, 37, 20, torch.bfloat16)
    truth = oracle(hp, wp, hq, wq, targets=targets, beta=1.0)
    lp, lq = (h @ w.T for h, w in ((hp, wp), (hq, wq)))  # (T, V) logits at bf16
    eye = torch.eye(401, dtype=torch.bfloat16)
    plain = oracle(lp, eye, lq, eye, targets=targets, beta=1.0)  # exact math on bf16 logits
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    fast = two_model_divergence(*(x.to(dev) for x in (hp, wp, hq, wq)), targets=targets.to(dev),
                                contrast_beta=1.0, impl=impl, token_chunk=16, vocab_chunk=128)
    for k in truth:
        err_fast = (fast[k].double().cpu() - truth[k]).abs().nan_to_num().max().item()
        err_plain = (plain[k] - truth[k]).abs().nan_to_num().max().item()
        assert err_fast <= err_plain, (k, err_fast, err_plain)


def test_large_logits_rescale_exactly():
    """Logits up to ~100 whose running max keeps growing across vocabulary chunks."""
    hp, wp, hq, wq, _, targets = make_inputs(9, 300, 8, 8, scale=6.0)
    order = (hp[0].double() @ wp.double().T).argsort()  # token 0's max comes in the last chunk
    wp = wp[order]
    got = two_model_divergence(hp, wp, hq, wq, targets=targets, contrast_beta=1.0, impl="torch",
                               token_chunk=5, vocab_chunk=64)
    want = oracle(hp, wp, hq, wq, targets=targets, beta=1.0)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=2e-3, equal_nan=True)


def test_dtypes_keys_and_empty():
    hp, wp, hq, wq, _, _ = make_inputs(5, 11, 4, 3)
    f64 = two_model_divergence(hp.double(), wp.double(), hq.double(), wq.double(), impl="torch")
    assert all(x.dtype == torch.float64 for x in f64.values())
    out = two_model_divergence(hp, wp, hq, wq, jsd=False)
    assert set(out) == set(KEYS) - {"jsd"}
    empty = two_model_divergence(hp[:0], wp, hq[:0], wq, targets=torch.zeros(0, dtype=torch.long))
    assert all(x.shape == (0,) for x in empty.values())


def test_errors():
    hp, wp, hq, wq, _, targets = make_inputs(5, 11, 4, 3)
    with pytest.raises(ValueError,
                       match=r"vocabulary sizes differ: weight_p has V=11 rows, weight_q has V=10"):
        two_model_divergence(hp, wp, hq, wq[:10])
    with pytest.raises(ValueError,
                       match=r"token counts differ: hidden_p has T=5, hidden_q has T=4"):
        two_model_divergence(hp, wp, hq[:4], wq)
    with pytest.raises(ValueError, match=r"hidden_q width 3 != weight_q width 4"):
        two_model_divergence(hp, wp, hq, torch.randn(11, 4))
    with pytest.raises(ValueError, match=r"bias_q must have shape \(11,\)"):
        two_model_divergence(hp, wp, hq, wq, bias_q=torch.zeros(10))
    with pytest.raises(ValueError, match="impl must be one of"):
        two_model_divergence(hp, wp, hq, wq, impl="cuda")
    with pytest.raises(ValueError, match=r"targets must be < V=11"):
        two_model_divergence(hp, wp, hq, wq, targets=torch.tensor([0, 1, 2, 3, 11]))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        two_model_divergence(hp, wp, hq, wq, targets=targets.float())
    with pytest.raises(ValueError, match="contrast_beta needs targets"):
        two_model_divergence(hp, wp, hq, wq, contrast_beta=1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        two_model_divergence(hp[None], wp, hq, wq)
