"""attention_with_stats: the blockwise path against the float64 full-matrix reference."""
from __future__ import annotations

import math

import pytest
import torch

from tokenprobe.kernels.attention import attention_with_stats


def make_inputs(bsz, heads, kvh, t, dh, dtype, lengths, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, t, dh, generator=g) * 2
    k = torch.randn(bsz, kvh, t, dh, generator=g) * 2
    v = torch.randn(bsz, kvh, t, dh, generator=g)
    k[:, :, 0] *= 4  # a strong first key, as sinks make
    i = torch.arange(t)
    allowed = (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    real = i[None, :] < torch.tensor(lengths)[:, None]  # (B, S) real keys
    mask = allowed[None, None] & real[:, None, None, :]
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, torch.tensor(lengths)


def explicit_eager(q, k, v, mask, scaling):
    """Plain float64 softmax attention: the textbook formula, no shared code."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) * scaling
    s = s.masked_fill(~mask, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(2, 4, 2, 41, 16, [41, 29]), (1, 9, 3, 67, 8, [67]),
                                   (3, 2, 1, 13, 32, [5, 13, 1])])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("impl", ["torch", "flash", "triton", "auto"])
@pytest.mark.parametrize("k_pos", [0, 2])
def test_fast_paths_match_reference(shape, dtype, tol, window, impl, k_pos):
    bsz, heads, kvh, t, dh, lengths = shape
    q, k, v, mask, lens = make_inputs(bsz, heads, kvh, t, dh, dtype, lengths, window)
    kw = dict(scaling=dh ** -0.5, k_pos=k_pos)
    if impl in ("flash", "triton") and window is not None:  # a window shorter than the prompt
        with pytest.raises(ValueError, match=f"impl='{impl}' needs"):
            attention_with_stats(q, k, v, mask, lens, impl=impl, **kw)
        return
    ref_out, ref = attention_with_stats(q, k, v, mask, lens, impl="reference", **kw)
    out, got = attention_with_stats(q, k, v, mask, lens, impl=impl, block=5, **kw)
    for b, n in enumerate(lengths):  # outputs at real queries only
        torch.testing.assert_close(out[b, :n].float(), ref_out[b, :n].float(), rtol=tol, atol=tol)
    for name in ("sink_mass", "attn_entropy", "received"):
        torch.testing.assert_close(got[name].double(), ref[name], rtol=tol, atol=tol)


def test_reference_equals_explicit_eager_hand_checks():
    q, k, v, mask, lens = make_inputs(2, 4, 2, 11, 8, torch.float64, [11, 6])
    _, stats = attention_with_stats(q, k, v, mask, lens, scaling=8 ** -0.5, impl="reference")
    a = explicit_eager(q, k, v, mask, 8 ** -0.5)
    for b, n in enumerate([11, 6]):
        for h in range(4):
            alpha0 = sum(a[b, h, i, 0] for i in range(n)) / n
            ent = sum(-sum(p * math.log(p) for p in a[b, h, i, :n].tolist() if p > 0)
                      for i in range(n)) / n
            assert stats["sink_mass"][b, h].item() == pytest.approx(alpha0.item(), rel=1e-10)
            assert stats["attn_entropy"][b, h].item() == pytest.approx(ent, rel=1e-10)
    # received: the first query attends only to key 0, so row 0 gives key 0 mass 1 per head
    assert stats["received"][1, 6:].abs().max() == 0  # padding keys receive nothing


def test_sink_at_other_position_and_softcap():
    q, k, v, mask, lens = make_inputs(1, 2, 2, 19, 8, torch.float32, [19])
    kw = dict(scaling=0.3, softcap=5.0, k_pos=3)
    _, ref = attention_with_stats(q, k, v, mask, lens, impl="reference", **kw)
    _, got = attention_with_stats(q, k, v, mask, lens, impl="torch", block=4, **kw)
    torch.testing.assert_close(got["sink_mass"].double(), ref["sink_mass"], rtol=1e-5, atol=1e-6)
    a = explicit_eager(q, k, v, mask, 1.0)  # recompute with softcap by hand
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    s = torch.tanh(s / 5.0) * 5.0
    a = torch.softmax(s.masked_fill(~mask, -math.inf), -1)
    assert ref["sink_mass"][0, 1].item() == pytest.approx(a[0, 1, 3:, 3].mean().item(), rel=1e-9)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_softcap_matches_reference(impl):
    q, k, v, mask, lens = make_inputs(2, 4, 2, 45, 8, torch.float32, [45, 30])
    kw = dict(scaling=0.7, softcap=3.0, k_pos=1)
    ref_out, ref = attention_with_stats(q, k, v, mask, lens, impl="reference", **kw)
    out, got = attention_with_stats(q, k, v, mask, lens, impl=impl, block=8, **kw)
    for b, n in enumerate([45, 30]):
        torch.testing.assert_close(out[b, :n], ref_out[b, :n].float(), rtol=1e-4, atol=1e-5)
    for name in ("sink_mass", "attn_entropy", "received"):
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-5)
    _, plain = attention_with_stats(q, k, v, mask, lens, impl="reference", scaling=0.7, k_pos=1)
    assert not torch.allclose(plain["attn_entropy"], ref["attn_entropy"], rtol=1e-3)  # capped


def test_zerotuning_equals_explicit_renormalisation():
    q, k, v, mask, lens = make_inputs(1, 4, 2, 23, 8, torch.float32, [23])
    gamma = torch.tensor([1.0, 0.5, 2.0, 0.0])
    kw = dict(scaling=8 ** -0.5, gamma=gamma)
    ref_out, _ = attention_with_stats(q, k, v, mask, lens, impl="reference", **kw)
    out, got = attention_with_stats(q, k, v, mask, lens, impl="torch", block=6, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    a = explicit_eager(q, k, v, mask, 8 ** -0.5)
    for h, g in enumerate(gamma.tolist()):
        expect = a[0, h].clone()
        expect[:, 0] *= g
        total = expect.sum(-1, keepdim=True)
        expect = torch.where(total > 0, expect / total, a[0, h])  # row 0 at gamma 0: unchanged
        assert got["sink_mass"][0, h].item() == pytest.approx(expect[:, 0].mean().item(), rel=1e-4)
    base, _ = attention_with_stats(q, k, v, mask, lens, scaling=8 ** -0.5, impl="torch")
    torch.testing.assert_close(out[:, :, 0], base[:, :, 0])  # gamma 1 leaves head 0 unchanged
    assert not torch.allclose(out[:, 1:, 1], base[:, 1:, 1])


def test_flash_with_no_mask_equals_causal_mask_and_refuses_what_it_cannot_do():
    q, k, v, mask, lens = make_inputs(1, 4, 2, 37, 8, torch.float32, [37])
    out, got = attention_with_stats(q, k, v, None, lens, scaling=0.4, impl="flash")
    ref_out, ref = attention_with_stats(q, k, v, mask, lens, scaling=0.4, impl="reference")
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-5)
    for name in ("sink_mass", "attn_entropy", "received"):
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-5)
    for extra in (dict(softcap=5.0), dict(gamma=torch.tensor([1.0, 2.0, 1.0, 1.0]))):
        with pytest.raises(ValueError, match="impl='flash' needs"):
            attention_with_stats(q, k, v, mask, lens, scaling=0.4, impl="flash", **extra)
        # auto falls back to the blockwise path and still matches the reference
        _, auto = attention_with_stats(q, k, v, mask, lens, scaling=0.4, impl="auto", **extra)
        _, ref = attention_with_stats(q, k, v, mask, lens, scaling=0.4, impl="reference", **extra)
        torch.testing.assert_close(auto["sink_mass"].double(), ref["sink_mass"], rtol=1e-4,
                                   atol=1e-5)


def test_unknown_impl_raises():
    q, k, v, mask, lens = make_inputs(1, 2, 2, 4, 4, torch.float32, [4])
    with pytest.raises(ValueError, match="impl must be one of"):
        attention_with_stats(q, k, v, mask, lens, scaling=1.0, impl="cuda")


def test_infinite_gamma_moves_all_attention_to_key_zero():
    q, k, v, mask, lens = make_inputs(1, 2, 1, 9, 4, torch.float32, [9])
    gamma = torch.tensor([1.0, math.inf])
    out, stats = attention_with_stats(q, k, v, mask, lens, scaling=0.5, gamma=gamma, impl="torch")
    torch.testing.assert_close(out[0, :, 1], v[0, 0, :1].expand(9, 4))  # every query reads v_0
    assert stats["sink_mass"][0, 1].item() == pytest.approx(1.0)
    assert stats["attn_entropy"][0, 1].item() == pytest.approx(0.0, abs=1e-6)
