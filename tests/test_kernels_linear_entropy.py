"""linear_entropy: the chunked torch and Triton paths against an explicit float64 log_softmax."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.target_rank import _resolved

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
FLOATS = ("lse", "entropy", "self_certainty", "topk_probs", "target_logprob")
MARGIN = 1e-3  # fp64 gap kept around every compared logit: far above fp32 tile rounding


def logits64(hidden, weight, bias, softcap):
    z = hidden.double() @ weight.double().T  # (T, V)
    if bias is not None:
        z = z + bias.double()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def explicit(hidden, weight, bias, softcap, targets, k):
    """The textbook formulas in float64 on the full logits; no code shared with the module."""
    z = logits64(hidden, weight, bias, softcap)
    logp = torch.log_softmax(z, dim=-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    out = {"lse": torch.logsumexp(z, -1), "entropy": -(logp.exp() * logp).sum(-1),
           "self_certainty": -(logp + math.log(z.shape[1])).mean(-1),  # -(1/V) sum log(V p)
           "topk_ids": top_ids, "topk_probs": top_logp.exp()}
    if targets is not None:
        has, idx = targets >= 0, targets.clamp(min=0)[:, None]
        out["target_logprob"] = torch.where(has, logp.gather(1, idx)[:, 0], math.nan)
        out["target_rank"] = torch.where(has, 1 + (z > z.gather(1, idx)).sum(-1), 0)
    return out


def make_case(t, v, d, dtype, *, bias, softcap, seed=0):
    """Inputs without near-ties, in `dtype`: (T, D) hidden, (V, D) weight, (V,) bias or None,
    (T,) targets. Random rows (logits of std ~4), keeping those whose top 5 logits lie MARGIN
    apart; each row's target is MARGIN away from every other logit, except rows 3, 7, 11, ...
    (target -1) and rows 1, 9, 17, ... (target -100), which have none."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2 * t + 8, d, generator=g) * 2).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (2 / math.sqrt(d))).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    srt, order = logits64(hidden, weight, b, softcap).sort(dim=-1)  # (2T + 8, V) ascending
    gap = srt.diff(dim=-1)
    wall = torch.full_like(srt[:, :1], math.inf)
    lonely = torch.minimum(torch.cat([wall, gap], 1), torch.cat([gap, wall], 1)) > MARGIN
    rows = ((gap[:, -4:] > MARGIN).all(-1) & lonely.any(-1)).nonzero()[:t, 0]
    assert len(rows) == t, "too many near-ties: change the seed"
    pick = torch.rand(t, v, generator=g).masked_fill(~lonely[rows], -1).argmax(-1, keepdim=True)
    targets = order[rows].gather(1, pick)[:, 0]
    targets[3::4] = -1
    targets[1::8] = -100
    return hidden[rows], weight, b, targets


def assert_matches(got, want, tol):
    for name in FLOATS:
        if name in want:
            g, w = got[name].double(), want[name]
            assert torch.equal(g.isnan(), w.isnan()), name
            err = (g - w).nan_to_num(0).abs().max().item()
            assert err <= tol, f"{name}: max error {err:.3g} > {tol}"
    assert torch.equal(got["topk_ids"], want["topk_ids"])
    if "target_rank" in want:
        assert got["target_rank"].dtype == torch.int64
        assert torch.equal(got["target_rank"], want["target_rank"])


SHAPES = [(41, 401, 37, 16, 97), (7, 1271, 16, 3, 500), (1, 3, 5, 2, 2), (130, 999, 64, 47, 128)]
LOGITS = [(False, None), (True, None), (False, 10.0), (True, 10.0)]  # (bias, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,softcap", LOGITS)
def test_torch_path_matches_float64_oracle(shape, dtype, bias, softcap):
    t, v, d, token_chunk, vocab_chunk = shape  # chunks that do not divide T or V
    hidden, weight, b, targets = make_case(t, v, d, dtype, bias=bias, softcap=softcap)
    k = min(3, v)
    got = linear_entropy(hidden, weight, bias=b, softcap=softcap, targets=targets, topk=k,
                         impl="torch", token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    assert got["entropy"].dtype == torch.float32 and got["topk_ids"].shape == (t, k)
    assert_matches(got, explicit(hidden, weight, b, softcap, targets, k), tol=1e-4)
    assert (got["target_rank"][targets < 0] == 0).all()
    assert got["target_logprob"][targets < 0].isnan().all()


def test_reference_equals_explicit_float64():
    hidden, weight, b, targets = make_case(41, 401, 37, torch.float64, bias=True, softcap=10.0)
    got = linear_entropy(hidden, weight, bias=b, softcap=10.0, targets=targets, topk=4,
                         impl="reference")
    assert got["lse"].dtype == torch.float64
    assert_matches(got, explicit(hidden, weight, b, 10.0, targets, 4), tol=1e-10)
    # self-certainty is KL(uniform || p), as torch.distributions computes it
    z = logits64(hidden, weight, b, 10.0)
    uniform = torch.distributions.Categorical(probs=torch.ones_like(z))
    kl = torch.distributions.kl_divergence(uniform, torch.distributions.Categorical(logits=z))
    torch.testing.assert_close(got["self_certainty"], kl, rtol=1e-10, atol=1e-10)
    assert (got["entropy"] >= 0).all() and (got["entropy"] <= math.log(401)).all()


def test_float64_inputs_stay_float64_and_defaults_chunk():
    # T > 512 and V > 4096: more than one tile of each at the default chunk sizes
    hidden, weight, b, targets = make_case(600, 5000, 8, torch.float64, bias=True, softcap=None,
                                           seed=1)
    got = linear_entropy(hidden, weight, bias=b, targets=targets, impl="torch")
    assert got["entropy"].dtype == torch.float64
    assert_matches(got, explicit(hidden, weight, b, None, targets, 2), tol=1e-10)
    auto = linear_entropy(hidden, weight, bias=b, targets=targets)  # CPU tensors: torch path
    assert all(torch.equal(auto[n].nan_to_num(0), got[n].nan_to_num(0)) for n in got)


def plain_statistics(hidden, weight, bias, softcap, targets):
    """The unfused path at the inputs' dtype: log_softmax of the materialised logits."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    return {"lse": torch.logsumexp(z, -1), "entropy": -(logp.exp() * logp).sum(-1),
            "self_certainty": -(logp + math.log(z.shape[1])).mean(-1),
            "target_logprob": logp.gather(1, targets[:, None])[:, 0]}


def check_no_worse_than_plain(impl, dtype, shape, **chunks):
    """ml-cross-entropy's rule, truth being the float64 values of the same (rounded) inputs: at
    float32, where both errors are the float32 matmul's, |fast - truth| <= |plain - truth| + 1e-5
    per token (apple/ml-cross-entropy's tolerance); at bf16 the max error is no larger."""
    hidden, weight, b, targets = make_case(*shape, dtype, bias=True, softcap=30.0, seed=3)
    targets = targets.abs() % shape[1]  # a target on every row
    truth = explicit(hidden, weight, b, 30.0, targets, 2)
    plain = plain_statistics(hidden, weight, b, 30.0, targets)
    fast = linear_entropy(hidden, weight, bias=b, softcap=30.0, targets=targets, impl=impl,
                          **chunks)
    for name in plain:
        fast_err = (fast[name].double() - truth[name]).abs()
        plain_err = (plain[name].double() - truth[name]).abs()
        if dtype == torch.float32:
            assert (fast_err <= plain_err + 1e-5).all(), name
        else:  # bf16 logits carry ~1e-2 errors that the float32 tiles avoid: strictly no worse
            assert fast_err.max() <= plain_err.max(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(41, 401, 37), (130, 999, 64)])
def test_torch_path_error_no_worse_than_plain_torch(dtype, shape):
    check_no_worse_than_plain("torch", dtype, shape, token_chunk=32, vocab_chunk=300)


def test_exact_ties_rank_counts_strictly_larger_and_topk_takes_lowest_id():
    # dyadic inputs: every logit is exact in any summation order, so ties are real ties
    g = torch.Generator().manual_seed(5)
    hidden = torch.randint(-3, 4, (9, 6), generator=g).float()
    weight = torch.randint(-3, 4, (50, 6), generator=g).float() / 4
    weight[[7, 23, 41]] = weight[3].clone()  # four tokens with identical logits
    hidden[:5] += 4 * weight[3]  # ... which lead rows 0-4
    targets = torch.tensor([3, 7, 23, 41, 0, 10, 20, 30, 49])
    z = logits64(hidden, weight, None, None)
    assert (z[:5, [3, 7, 23, 41]] == z[:5].amax(-1, keepdim=True)).all()
    want_rank = 1 + (z > z.gather(1, targets[:, None])).sum(-1)
    assert want_rank[0] == want_rank[1] == want_rank[2] == want_rank[3]  # tied tokens share it
    want_ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :4]
    impls = ["reference", "torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
    for impl in impls:
        got = linear_entropy(hidden, weight, targets=targets, topk=4, impl=impl,
                             token_chunk=4, vocab_chunk=16)
        assert torch.equal(got["target_rank"], want_rank), impl
        # the returned ids carry the top logits; lowest id first among equals except in "torch"
        assert torch.equal(z.gather(1, got["topk_ids"]), z.gather(1, want_ids)), impl
        if impl != "torch":
            assert torch.equal(got["topk_ids"], want_ids), impl


def test_resolved_tells_when_the_estimate_count_is_exact():
    est = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    hit = torch.tensor([1.0, 1.5, 1.5, 1.5, 0.5, 0.5])  # the target's logit from its tile
    above = torch.tensor([2.0, 2.0, 1.2, 1.5, 2.0, 2.0])  # nearest other logit > est
    below = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 0.5])  # nearest other logit <= est
    # 1.2 in (est, hit] was counted but is below the target; 1.5 ties it (not strictly larger);
    # 0.7 in (hit, est] was not counted but is above it; 0.5 ties it and is rightly not counted
    assert _resolved(est, hit, above, below).tolist() == [True, True, False, False, False, True]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,bias,softcap,k", [
    ((41, 401, 37), True, 10.0, 2), ((7, 150, 100), False, None, 4),  # D spans two blocks
    ((1, 3, 5), True, None, 3), ((20, 67, 16), False, 10.0, 1)])
def test_triton_matches_float64_oracle(shape, bias, softcap, k, dtype):
    hidden, weight, b, targets = make_case(*shape, dtype, bias=bias, softcap=softcap, seed=2)
    got = linear_entropy(hidden, weight, bias=b, softcap=softcap, targets=targets, topk=k,
                         impl="triton", token_chunk=16, vocab_chunk=32)
    assert got["entropy"].dtype == torch.float32 and got["topk_ids"].dtype == torch.int64
    assert_matches(got, explicit(hidden, weight, b, softcap, targets, k), tol=1e-4)
    no_targets = linear_entropy(hidden, weight, bias=b, softcap=softcap, topk=k, impl="triton",
                                token_chunk=16, vocab_chunk=32)
    assert "target_rank" not in no_targets
    torch.testing.assert_close(no_targets["entropy"], got["entropy"], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_float32_hidden_with_bfloat16_weight(impl):
    hidden, weight, b, targets = make_case(41, 401, 37, torch.bfloat16, bias=True, softcap=10.0)
    noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    hidden = hidden.float() + 1e-4 * noise  # no longer representable in bf16
    want = explicit(hidden, weight, b, 10.0, targets, 2)  # inputs kept in their own dtypes
    got = linear_entropy(hidden, weight, bias=b, softcap=10.0, targets=targets, impl=impl,
                         token_chunk=16, vocab_chunk=64)
    assert_matches(got, want, tol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_error_no_worse_than_plain_torch(dtype):
    check_no_worse_than_plain("triton", dtype, (41, 401, 37), token_chunk=16, vocab_chunk=64)


@pytest.mark.parametrize("change,match", [
    ({"impl": "cuda"}, "impl must be one of"),
    ({"hidden": torch.zeros(4, 7)}, "same D"),
    ({"hidden": torch.zeros(4, 6, 1)}, r"hidden must be \(T, D\)"),
    ({"hidden": torch.zeros(4, 6, dtype=torch.int64)}, "must be floating point"),
    ({"bias": torch.zeros(9)}, r"bias must have shape \(V,\) = \(10,\)"),
    ({"targets": torch.tensor([0, 1, 2])}, r"targets must be an integer \(T,\) = \(4,\)"),
    ({"targets": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "targets must be an integer"),
    ({"targets": torch.tensor([0, 10, -1, 2])}, "target ids must be < V = 10"),
    ({"topk": 0}, r"topk must be in \[1, V\] = \[1, 10\]"),
    ({"topk": 11}, r"topk must be in \[1, V\]"),
    ({"softcap": 0.0}, "softcap must be positive"),
    ({"vocab_chunk": 0}, "chunks must be >= 1"),
])
def test_bad_arguments_raise(change, match):
    args = {"hidden": torch.zeros(4, 6), "weight": torch.zeros(10, 6)} | change
    hidden, weight = args.pop("hidden"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        linear_entropy(hidden, weight, **args)


@needs_triton
def test_triton_rejects_large_topk_and_float64():
    hidden, weight = torch.zeros(4, 6), torch.zeros(10, 6)
    with pytest.raises(ValueError, match="impl='triton' supports topk <= 4"):
        linear_entropy(hidden, weight, topk=5, impl="triton")
    with pytest.raises(ValueError, match="not float64"):
        linear_entropy(hidden.double(), weight.double(), impl="triton")


def test_no_tokens_gives_empty_outputs():
    got = linear_entropy(torch.zeros(0, 6), torch.randn(10, 6), targets=torch.zeros(0).long(),
                         impl="torch")
    assert got["entropy"].shape == (0,) and got["topk_ids"].shape == (0, 2)
    assert got["target_rank"].shape == (0,)


def twin_targets(hidden: torch.Tensor, weight: torch.Tensor, g: torch.Generator):
    """Targets of which every 4th has a twin column (its weight row copied 150 ids on, in
    another vocab tile of 128), and their exact ranks (float64 logits, strictly larger)."""
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=g)
    weight[(targets[::4] + 150) % weight.shape[0]] = weight[targets[::4]]
    z = logits64(hidden, weight, None, None)
    return targets, 1 + (z > z.gather(1, targets[:, None])).sum(-1)


def exact_tie_case():
    """(hidden, weight, targets, ranks) whose twin logits are equal under any BLAS: entries are
    multiples of 1/8 and 1/64 with small numerators, so every product and sum is exact."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randint(-8, 9, (64, 256), generator=g).float() / 8
    weight = torch.randint(-8, 9, (300, 256), generator=g).float() / 64
    return (hidden, weight, *twin_targets(hidden, weight, g))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rank_is_exact_on_an_exact_tie(impl):
    # Every 4th row's target has a twin column (an identical weight row) in another vocab tile.
    # Entries are multiples of 1/8 and 1/64 with small numerators, so every product and partial
    # sum is exact in float32: the two logits are equal under any BLAS and any blocking, and the
    # twin must not count (a ">=" in the rank comparison counts it).
    hidden, weight, targets, want = exact_tie_case()
    got = linear_entropy(hidden, weight, targets=targets, impl=impl, token_chunk=64,
                         vocab_chunk=128)
    assert torch.equal(got["target_rank"], want)


# Triton runs here only on a GPU: in the interpreter tl.dot blocks are numpy matmuls, and some
# BLAS builds round identical columns of different blocks differently (numpy 2.4's OpenBLAS on an
# AMD EPYC: 2e-7 apart), so the premise below fails there; `test_rank_is_exact_on_an_exact_tie`
# checks the interpreted kernel's tie handling with a tie no BLAS can break.
ON_GPU = [pytest.param("triton", marks=needs_triton)] if torch.cuda.is_available() else []


@pytest.mark.parametrize("impl", ["torch", *ON_GPU])
def test_rank_is_exact_when_a_tie_hides_behind_rounding(impl):
    # Every 4th row's target has a twin column (an identical weight row), so the two logits are
    # equal in any one matmul and the twin must not count. A separately rounded dot product of
    # the target differs from the matmul's value in its last bits, so counting against it alone
    # gets some of those ranks wrong by one; the kernel must recount against the tile's value.
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 256, generator=g), torch.randn(300, 256, generator=g) / 16
    targets, want = twin_targets(hidden, weight, g)
    # Where a BLAS rounds the separate dot product exactly like the matmul, no recount is
    # needed; the rank must be exact either way.
    got = linear_entropy(hidden, weight, targets=targets, impl=impl, token_chunk=64,
                         vocab_chunk=128)
    assert torch.equal(got["target_rank"], want)


def test_a_near_tie_is_resolved_within_its_sweep(monkeypatch):
    """The twins' rows (another logit equal to the target's, inside the estimate's band) are
    resolved from the band's logits kept in the one sweep: no token is swept again, where a
    second sweep (of a few rows) cost as much as a tenth of the op on a real 1,016-token batch."""
    import tokenprobe.kernels.linear_entropy as le

    swept, sweep = [], le._sweep
    monkeypatch.setattr(le, "_sweep", lambda h, *a, **k: swept.append(len(h)) or sweep(h, *a, **k))
    kept, keep = [], le._keep_band
    monkeypatch.setattr(le, "_keep_band", lambda band, *a: keep(band, *a) or kept.append(len(band)))
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(64, 256, generator=g), torch.randn(300, 256, generator=g) / 16
    targets, want = twin_targets(hidden, weight, g)
    got = linear_entropy(hidden, weight, targets=targets, impl="torch", token_chunk=64,
                         vocab_chunk=128)
    assert torch.equal(got["target_rank"], want)
    assert swept == [64] and kept[-1] > 0  # one sweep, with band logits kept


@pytest.mark.parametrize("offset", [0.01, -0.01])
def test_ranks_stay_exact_when_the_estimate_misses_its_band(monkeypatch, offset):
    """An estimate farther from the tile's value than its rounding band (forced here) must not
    count the logits between the two: those tokens are counted again against the tile value."""
    import tokenprobe.kernels.linear_entropy as le

    estimate = le._target_estimate
    monkeypatch.setattr(le, "_target_estimate", lambda *a: estimate(*a) + offset)
    g = torch.Generator().manual_seed(1)  # dense logits: many within 0.01 of each target
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(3000, 32, generator=g)
    targets = torch.randint(0, 3000, (64,), generator=g)
    got = linear_entropy(hidden, weight, targets=targets, impl="torch", token_chunk=16,
                         vocab_chunk=1024)
    z = logits64(hidden, weight, None, None)
    want = 1 + (z > z.gather(1, targets[:, None])).sum(-1)
    assert torch.equal(got["target_rank"], want)


def test_compiled_tile_step_matches_the_oracle_and_keeps_ranks_exact(monkeypatch):
    """The torch path with its tile step through torch.compile (TOKENPROBE_COMPILE=1; on by
    default for CPU runs of a full token chunk or more): full tiles go through the compiled
    step, the rest through the plain one, with the same results."""
    import tokenprobe.kernels.linear_entropy as le

    monkeypatch.setenv(le.COMPILE_ENV, "1")
    monkeypatch.setattr(le, "_COMPILED", {})
    monkeypatch.setattr(le, "COMPILE_SECONDS", {})
    hidden, weight, b, targets = make_case(130, 999, 64, torch.float32, bias=True, softcap=10.0)
    got = linear_entropy(hidden, weight, bias=b, softcap=10.0, targets=targets, topk=3,
                         impl="torch", token_chunk=47, vocab_chunk=128)
    assert "targets" in le.COMPILE_SECONDS  # the compiled step ran (a fallback would not)
    assert_matches(got, explicit(hidden, weight, b, 10.0, targets, 3), tol=1e-4)
    check_no_worse_than_plain("torch", torch.float32, (130, 999, 64), token_chunk=47,
                              vocab_chunk=128)
    hidden, weight, targets, want = exact_tie_case()
    got = linear_entropy(hidden, weight, targets=targets, impl="torch", token_chunk=64,
                         vocab_chunk=128)
    assert torch.equal(got["target_rank"], want)
    plain = linear_entropy(hidden, weight, impl="torch", token_chunk=64, vocab_chunk=128)
    assert "plain" in le.COMPILE_SECONDS and torch.equal(plain["topk_ids"], got["topk_ids"])


def test_compile_is_automatic_only_for_long_runs_on_cpu(monkeypatch):
    from tokenprobe.kernels.linear_entropy import COMPILE_ENV, compile_wanted

    import tokenprobe.kernels.linear_entropy as le

    cpu = torch.device("cpu")
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.setattr(le, "_PLAIN_LOGITS", [0])
    assert not compile_wanted(cpu, torch.float32, 512, 512)  # a short run never compiles
    hidden, weight = torch.randn(64, 8), torch.randn(40, 8)
    for _ in range(3):  # 2 x 4 full tiles of 32 x 10 a call, counted while plain
        linear_entropy(hidden, weight, token_chunk=32, vocab_chunk=10)
    assert le._PLAIN_LOGITS == [3 * 8 * 320]
    monkeypatch.setattr(le, "COMPILE_AFTER", 3 * 8 * 320)
    assert compile_wanted(cpu, torch.float32, 512, 512)  # it has shown it is long
    assert not compile_wanted(cpu, torch.float32, 511, 512)  # no full chunk to compile for
    assert not compile_wanted(cpu, torch.float64, 4096, 512)
    assert not compile_wanted(torch.device("cuda"), torch.float32, 4096, 512)
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not compile_wanted(cpu, torch.float32, 4096, 512)
