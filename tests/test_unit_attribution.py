"""Attribution to prompt units (tokenprobe.analyses.unit_attribution) and the compression curve
(attribution_compression): removal and knockout of a whole unit against forwards built by hand,
Shapley efficiency in the table, the curve's subsets, the run and the CLI."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tokenprobe
from tokenprobe.analyses.attribution_compression import compression_curve, kept, ranking
from tokenprobe.analyses.attribution_shapley import UnitGame
from tokenprobe.analyses.attribution_targets import resolve_target
from tokenprobe.analyses.attribution_units import split_units
from tokenprobe.analyses.unit_attribution import (UnitAttributionConfig, attribute_units,
                                                  knockout_units, unit_attribution_run)
from tokenprobe.cli.args import EXIT_OK, EXIT_USAGE
from tokenprobe.cli.main import main

PROMPT = "The cat sat on the mat today"
OPTIONS = (" and", " but")


def logprob(model, ids: list[int], opt: list[int], mask: torch.Tensor | None = None) -> float:
    """log p(opt | ids) from one unpadded forward (float64 log-softmax)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + opt]), attention_mask=mask).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(opt))


def contrast(model, ids, a, b, mask=None) -> float:
    """log p(a) - log p(b), each option with its own forward."""
    size = len(ids) + len(a)
    ma = None if mask is None else mask(size)
    mb = None if mask is None else mask(len(ids) + len(b))
    return logprob(model, ids, a, ma) - logprob(model, ids, b, mb)


@pytest.fixture(scope="module")
def case(tiny_llama):
    ids, units = split_units(tiny_llama.tokenizer, PROMPT, "word")
    target = resolve_target(tiny_llama, ids, options=OPTIONS)
    a, b = list(target.ids), list(target.alt_ids)
    return tiny_llama, ids, units, target, a, b


def test_removal_of_a_unit_equals_a_forward_without_it(case):
    loaded, ids, units, target, a, b = case
    frame, _, summary = attribute_units(loaded, PROMPT, UnitAttributionConfig(
        methods=("removal",)), options=OPTIONS)
    full = contrast(loaded.model, ids, a, b)
    assert summary["target_value"] == pytest.approx(full, abs=1e-5)
    for unit, value in zip(units, frame.value):
        short = [t for p, t in enumerate(ids) if p not in unit.positions]
        assert value == pytest.approx(full - contrast(loaded.model, short, a, b), abs=1e-5)


def test_knockout_of_a_unit_equals_a_hand_built_mask(case):
    loaded, ids, units, target, a, b = case
    eager = copy.deepcopy(loaded.model)
    eager.set_attn_implementation("eager")
    got = knockout_units(loaded, ids, units, target, batch_size=3)
    full = contrast(eager, ids, a, b)
    for unit, value in zip(units, got):
        def mask(t, keys=unit.positions):
            allowed = torch.ones(t, t, dtype=torch.bool).tril()
            for j in keys:
                allowed[j + 1:, j] = False  # every later query loses key j
            return torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[
                None, None]
        assert value == pytest.approx(full - contrast(eager, ids, a, b, mask), abs=1e-4)
    assert len(units[1].positions) > 1  # a unit of several keys at once


def test_shapley_rows_are_efficient_and_methods_share_units(case):
    loaded, ids, units, *_ = case
    config = UnitAttributionConfig(methods=("input_x_gradient", "shapley", "removal"),
                                   compression=True, draws=4)
    frame, curves, summary = attribute_units(loaded, PROMPT, config, options=OPTIONS)
    shap = frame[frame.method == "shapley"]
    assert summary["shapley_exact"] and (shap.se == 0).all()
    assert shap.value.sum() == pytest.approx(summary["target_value"] - summary["empty_value"],
                                             abs=1e-6)
    for method, rows in frame.groupby("method"):
        assert rows.text.tolist() == [u.text for u in units], method
    assert (curves.ranking == "shapley").all()


def test_compression_curve_scores_the_ranked_subsets(case):
    loaded, ids, units, target, *_ = case
    game = UnitGame(loaded, ids, units, target)
    scores = np.array([0.5, -1.0, 2.0, 0.1, 0.1, -0.3, 0.0])[:game.n]
    curve = compression_curve(game, scores, fractions=(0.0, 0.3, 1.0), draws=5, seed=1)
    order = ranking(scores)
    assert order[:3].tolist() == [2, 0, 3]  # ties keep text order (3 before 4)
    row = curve[(curve.order == "top") & (curve.keep_fraction == 0.3)].iloc[0]
    k = kept(game.n, 0.3)
    mask = np.zeros((1, game.n), dtype=bool)
    mask[0, order[:k]] = True
    assert row.n_kept == k == 3 and row.value == pytest.approx(game.values(mask)[0])
    bottom = curve[(curve.order == "bottom") & (curve.keep_fraction == 0.3)].iloc[0]
    mask = np.zeros((1, game.n), dtype=bool)
    mask[0, order[-k:]] = True
    assert bottom.value == pytest.approx(game.values(mask)[0])
    ends = curve[curve.keep_fraction.isin([0.0, 1.0])]
    full, empty = game.values(np.array([[True] * game.n, [False] * game.n]))
    assert np.allclose(ends[ends.keep_fraction == 1.0].value, full)
    assert np.allclose(ends[ends.keep_fraction == 0.0].value, empty)
    random = curve[(curve.order == "random") & (curve.keep_fraction == 0.3)].iloc[0]
    assert random.draws == 5 and random.se > 0
    with pytest.raises(ValueError, match="one score per unit"):
        compression_curve(game, scores[:2])


def test_the_run_and_the_cli(tmp_path, capsys, tiny_llama):
    run = unit_attribution_run(tiny_llama, [PROMPT, "Yes or no"], UnitAttributionConfig(
        methods=("saliency", "shapley"), permutations=8, compression=True, draws=2),
        options=OPTIONS, out=tmp_path / "r")
    back = tokenprobe.open_run(tmp_path / "r")
    assert set(back.meta["tables"]) == {"prompts", "tokens", "unit_attributions",
                                        "attribution_curves"}
    shap = back.unit_attributions[back.unit_attributions.method == "shapley"]
    assert (shap.se > 0).all() and not run.meta["summary"]["unit_attribution"][0][
        "shapley_exact"]
    code = main(["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--options", *OPTIONS,
                 "--method", "removal", "shapley", "--units", "word", "--compression",
                 "--out", str(tmp_path / "cli"), "--quiet"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "shapley" in out and "compression (top-k by shapley)" in out
    table = tokenprobe.open_run(tmp_path / "cli").unit_attributions
    assert set(table.method) == {"removal", "shapley"}
    for argv in (["--units", "span"], ["--target", " x"], ["--permutations", "3"],
                 ["--window", "3"]):
        code = main(["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--options",
                     *OPTIONS, "--out", str(tmp_path / "bad"), *argv])
        assert code == EXIT_USAGE, argv
        assert not (tmp_path / "bad").exists()
