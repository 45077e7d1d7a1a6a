"""The activations probe against hand-computed cases and an independent eager reference."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS, block_outputs

import tokenprobe
from tokenprobe.probes.activations import (
    ActivationsConfig,
    ActivationsProbe,
    lower_median,
    massive_activations,
    residual_stats,
)


def reference_token_layers(h: torch.Tensor) -> pd.DataFrame:
    """Plain numpy float64 statistics of a (L, T, D) residual stack, one prompt."""
    rows = []
    for layer, hl in enumerate(h.numpy()):
        a = np.abs(hl)
        for pos, vec in enumerate(hl):
            srt = np.sort(a[pos])
            rows.append({
                "layer": layer, "pos": pos,
                "resid_norm": np.sqrt((vec ** 2).sum()),
                "max_abs": srt[-1],
                "max_abs_dim": int(np.argmax(a[pos])),
                "median_abs": srt[(len(srt) - 1) // 2],  # lower median
                "cos_to_first": vec @ hl[0] / np.sqrt((vec ** 2).sum() * (hl[0] ** 2).sum()),
            })
    return pd.DataFrame(rows)


def reference_massive(h: torch.Tensor, abs_threshold: float, median_ratio: float) -> set:
    found = set()
    for layer, hl in enumerate(h.numpy()):
        a = np.abs(hl)
        flat = np.sort(a.ravel())
        median = flat[(len(flat) - 1) // 2]
        for pos, dim in zip(*np.nonzero((a > abs_threshold) & (a > median_ratio * median))):
            found.add((layer, int(pos), int(dim)))
    return found


def test_residual_stats_hand_case():
    h = torch.tensor([[3.0, -4.0, 0.0, 1.0],
                      [-6.0, 8.0, 0.0, 2.0]])
    s = residual_stats(h)
    torch.testing.assert_close(s["resid_norm"], torch.tensor([26 ** 0.5, 104 ** 0.5]))
    torch.testing.assert_close(s["max_abs"], torch.tensor([4.0, 8.0]))
    assert s["max_abs_dim"].tolist() == [1, 1]
    # |h| sorted: [0, 1, 3, 4] and [0, 2, 6, 8]: the lower median of 4 values is the 2nd.
    torch.testing.assert_close(s["median_abs"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(s["cos_to_first"], torch.tensor([1.0, -48 / (26 ** 0.5 * 104 ** 0.5)]))


def test_residual_stats_odd_shape_matches_numpy():
    torch.manual_seed(0)
    h = torch.randn(1, 41, 401, dtype=torch.float64) * 3
    ref = reference_token_layers(h)
    got = residual_stats(h[0])
    for col in ["resid_norm", "max_abs", "median_abs", "cos_to_first"]:
        np.testing.assert_allclose(got[col].numpy(), ref[col].to_numpy(), rtol=1e-6)
    assert got["max_abs_dim"].tolist() == ref["max_abs_dim"].tolist()


@pytest.mark.parametrize("shape", [(1,), (2,), (7, 5), (41, 576), (3, 4, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lower_median_is_torch_median(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=dtype).abs()
    x.view(-1)[:: 3] = x.view(-1)[0]  # ties
    got = lower_median(x)
    assert got.shape == () and got.dtype == dtype and got.item() == x.median().item()
    for dim in range(x.dim()):
        assert torch.equal(lower_median(x, dim=dim), x.median(dim=dim).values)
    x.view(-1)[-1] = float("nan")  # torch.median's NaN rule is kept
    assert torch.isnan(lower_median(x))


def test_massive_criterion_needs_both_conditions():
    h = torch.full((3, 8), 0.05)
    h[0, 2] = 150.0     # > 100 and > 1000 x 0.05 = 50: massive
    h[1, 5] = -120.0    # negative values count by magnitude: massive
    h[2, 7] = 100.0     # not strictly above 100: not massive
    found = massive_activations(h)
    assert list(zip(found["pos"].tolist(), found["dim"].tolist())) == [(0, 2), (1, 5)]
    torch.testing.assert_close(found["value"], torch.tensor([150.0, -120.0]))
    torch.testing.assert_close(found["ratio_to_median"], torch.tensor([3000.0, 2400.0]))
    # The ratio condition alone can veto: raise the median so 150 < 1000 x median.
    h2 = h.clone()
    h2[h2 == 0.05] = 1.0
    assert len(massive_activations(h2)["pos"]) == 0
    assert len(massive_activations(h2, median_ratio=100.0)["pos"]) == 2


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_probe_equals_eager_reference_with_padding(name, request):
    loaded = request.getfixturevalue(name)
    run = tokenprobe.run(loaded, PROMPTS, ["activations"], batch_size=3, progress=False)
    tl = run.token_layers
    for prompt_id, text in enumerate(PROMPTS):
        ids, h = block_outputs(loaded, text)
        ref = reference_token_layers(h)
        got = tl[tl.prompt_id == prompt_id].reset_index(drop=True)
        assert len(got) == len(ref) == loaded.model.config.num_hidden_layers * len(ids)
        assert got.pos.max() == len(ids) - 1  # padding positions never appear
        for col in ["resid_norm", "max_abs", "median_abs", "cos_to_first"]:
            np.testing.assert_allclose(got[col], ref[col], rtol=1e-4, atol=1e-6, err_msg=col)
        assert (got.max_abs_dim == ref.max_abs_dim).all()
        tokens = run.tokens[run.tokens.prompt_id == prompt_id]
        assert tokens.token_id.tolist() == ids


def test_massive_table_equals_reference_with_low_thresholds(tiny_llama):
    config = ActivationsConfig(abs_threshold=0.5, median_ratio=4.0)
    run = tokenprobe.run(tiny_llama, PROMPTS, [ActivationsProbe(config)], progress=False)
    m = run.massive
    assert len(m) > 0
    for prompt_id, text in enumerate(PROMPTS):
        _, h = block_outputs(tiny_llama, text)
        expected = reference_massive(h, 0.5, 4.0)
        mine = m[m.prompt_id == prompt_id]
        assert set(zip(mine.layer, mine.pos, mine.dim)) == expected
        medians = [np.sort(np.abs(hl).ravel())[(hl.size - 1) // 2] for hl in h.numpy()]
        for row in mine.itertuples():
            np.testing.assert_allclose(row.value, h[row.layer, row.pos, row.dim], rtol=1e-5)
            np.testing.assert_allclose(row.ratio_to_median, abs(row.value) / medians[row.layer],
                                       rtol=1e-5)  # this prompt's own layer median


def test_bos_model_records_special_first_token(tiny_gemma3, tiny_llama):
    gemma = tokenprobe.run(tiny_gemma3, PROMPTS[:1], progress=False)
    llama = tokenprobe.run(tiny_llama, PROMPTS[:1], progress=False)
    assert gemma.prompts.first_is_special.tolist() == [True]
    assert gemma.tokens.iloc[0].token == "<bos>" and gemma.tokens.iloc[0].is_special
    assert llama.prompts.first_is_special.tolist() == [False]


def test_layer_buffers_fill_per_layer_and_keep_dtypes():
    from tokenprobe.probe import LayerBuffers

    buffers = LayerBuffers(n_layers=3)
    buffers.put("norm", 2, (1, slice(0, 2)), torch.tensor([1.5, 2.5]), (2, 4))
    buffers.put("norm", 0, (0, slice(0, 4)), torch.arange(4.0), (2, 4))
    buffers.put("dim", 2, (1,), np.int64(7), (2,))
    assert buffers.layers == [2, 0]
    norm = buffers["norm"]
    assert norm.shape == (3, 2, 4) and norm.dtype == np.float32
    assert norm[2, 1, :2].tolist() == [1.5, 2.5] and np.isnan(norm[2, 1, 2:]).all()
    assert norm[0, 0].tolist() == [0, 1, 2, 3] and np.isnan(norm[1]).all()
    assert buffers["dim"].dtype == np.int64 and buffers["dim"][2].tolist() == [0, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", [[7, 4, 2, 7, 4], [7, 4, 4, 4, 2], [130, 3]])
def test_batch_medians_are_torch_medians_with_padding_and_nan(lengths, dtype):
    """The hook's medians of a right-padded batch: per token and per prompt (its real tokens
    only; prompts of one length together, adjacent or not) the same element as torch.median,
    NaN where a NaN is."""
    from tokenprobe.probes.activations import batch_medians

    g = torch.Generator().manual_seed(0)
    a = torch.randn(len(lengths), max(lengths), 10, generator=g, dtype=dtype).abs()
    a[0, 2, 3] = float("nan")
    a[1, 5, 0] = float("nan")  # padding: must not touch prompt 1
    a[-1, 1, 4] = float("inf")
    a[0, 6, :3] = 0.0
    token, prompt = batch_medians(a, lengths, a.amax(-1).isnan())
    assert token.dtype == prompt.dtype == dtype
    for row, n in enumerate(lengths):
        torch.testing.assert_close(token[row, :n], a[row, :n].median(-1).values, equal_nan=True)
        torch.testing.assert_close(prompt[row], a[row, :n].median(), equal_nan=True)
    assert prompt.isnan().tolist() == [True] + [False] * (len(lengths) - 1)


def test_kth_smallest_is_the_element_np_partition_picks():
    """The bracketed selection of the layer medians: the element np.partition puts at k, for
    heavy-tailed rows with ties, inf and NaN, a constant row, and rows whose strided sample
    misleads the bracket (every 17th value huge, or all the small values in the sample)."""
    from tokenprobe.probes.activations import kth_smallest

    g = np.random.default_rng(0)
    n = 128 * 576
    rows = [np.abs(g.standard_t(2, n)), np.round(np.abs(g.normal(0, 3, n)), 1),
            np.full(n, 0.5), np.abs(g.normal(0, 1, n))]
    rows[0][::997] = np.inf
    rows[3][:1000] = np.nan
    fooled = np.abs(g.normal(0, 1, n))
    fooled[::17] = 1e6  # the sample (every 17th) sees only the huge values
    low = np.abs(g.normal(0, 1, n)) + 10
    low[::17] = 0.0  # ... or only the small ones
    x = np.stack(rows + [fooled, low]).astype(np.float32)
    for k in ((n - 1) // 2, 0, n - 1, 1234):
        assert np.array_equal(kth_smallest(x, k), np.partition(x, k, axis=-1)[:, k],
                              equal_nan=True)
