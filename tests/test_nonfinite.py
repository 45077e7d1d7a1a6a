"""NaN and inf from the model are found, recorded, kept out of summaries and rendered, never
averaged in as numbers or mislabelled."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import tokenprobe
from tokenprobe.analyses.sinks import sink_rate
from tokenprobe.cli.args import EXIT_NONFINITE
from tokenprobe.cli.main import main
from tokenprobe.probe import nonfinite_row
from tokenprobe.store import open_run

PROMPTS = ["the cat sat", "a dog ran far"]


@pytest.fixture(scope="module")
def nan_model(tiny_llama):
    """tiny-llama with a NaN embedding row for 'e' (in prompt 0, not in prompt 1). Its
    unembedding is tied, so every next-token distribution of both prompts is NaN too."""
    model = copy.deepcopy(tiny_llama)
    e = tiny_llama.tokenizer.convert_tokens_to_ids("e")
    with torch.no_grad():
        model.model.get_input_embeddings().weight[e] = float("nan")
    return model


def test_nonfinite_row_counts_items_and_skips_finite():
    assert nonfinite_row("p", "s", 0, 3, {"a": np.ones(4)}) is None
    row = nonfinite_row("p", "s", 2, 3, {"a": np.array([1, np.nan, 2, np.inf]),
                                         "b": np.array([np.inf, 0, 0, 0])}, offset=1)
    assert (row["n_checked"], row["n_nonfinite"], row["first_index"]) == (4, 3, 1)
    assert (row["n_nan"], row["n_inf"], row["statistics"]) == (1, 2, "a,b")


def test_a_nan_embedding_is_recorded_and_kept_out_of_the_summaries(nan_model, tiny_llama):
    run = tokenprobe.run(nan_model, PROMPTS, progress=False)
    clean = tokenprobe.run(tiny_llama, PROMPTS, progress=False)
    assert clean.nonfinite.empty and clean.meta["warnings"] == []
    found = run.nonfinite
    # prompt 0: the residual is NaN from block 0 on, at every position (attention's P @ V
    # multiplies the NaN value at 'e' by 0 for the queries before it: 0 * NaN = NaN)
    first = found[(found.prompt_id == 0) & (found.probe == "activations")].iloc[0]
    assert (first.layer, first.site) == (0, "resid_post")
    assert first.n_nonfinite == first.n_checked == 11
    assert set(found[found.prompt_id == 0].site) == {"resid_post", "attention", "logits"}
    assert set(found[found.prompt_id == 1].site) == {"logits"}  # only the tied unembedding
    (warning,) = run.meta["warnings"]
    assert "2 of 2 prompt(s), first in prompt 0 at layer 0" in warning
    # the sink rate leaves prompt 0 out instead of counting NaN heads as "not a sink"
    rates = sink_rate(run).set_index("prompt_id")
    assert np.isnan(rates.sink_rate[0]) and rates.nonfinite_heads[0] > 0
    assert rates.sink_rate[1] == sink_rate(clean).set_index("prompt_id").sink_rate[1]
    summary = run.meta["summary"]["sinks"]
    assert summary["prompts_excluded"] == 1
    assert summary["sink_rate"] == sink_rate(clean).set_index("prompt_id").sink_rate[1]
    assert run.sinks.prompt_id.tolist() == [1]  # no sinks labelled from NaN cosines
    # entropy: every prompt is NaN, so nothing is averaged and the means say NaN
    assert run.meta["summary"]["entropy"] == {"n_scored": 0, "prompts_excluded": 2,
                                             "score": "response"}
    assert run.prompts.mean_entropy.isna().all() and run.prompts.perplexity.isna().all()
    assert run.tokens.band.isna().all() and run.tokens.window_entropy.isna().all()


def test_the_cli_warns_once_and_strict_fails(nan_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tokenprobe, "load", lambda *a, **k: nan_model)
    args = ["run", "--model", "tiny-llama", "--quiet", *sum((["--prompt", p] for p in PROMPTS), [])]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert err.count("tokenprobe: warning: non-finite values") == 1
    assert "entropy n/a: NaN or inf at 10 of 10 scored positions" in out
    assert "nothing to score" not in out and "sink rate n/a" in out
    assert main([*args, "--out", str(tmp_path / "b"), "--strict"]) == EXIT_NONFINITE
    saved = json.loads((tmp_path / "b" / "run.json").read_text())
    assert saved["status"] == "complete" and len(saved["warnings"]) == 1
    assert not open_run(tmp_path / "b").nonfinite.empty


def test_report_and_heatmaps_render_nan_and_inf(nan_model, tmp_path):
    import pandas as pd

    from tokenprobe.analyses.report import write_report
    from tokenprobe.analyses import figures

    run = tokenprobe.run(nan_model, PROMPTS, progress=False)
    write_report([run], tmp_path / "report", static=False)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "non-finite values (NaN or inf)" in page
    summary = pd.read_csv(tmp_path / "report" / "tables" / "summary.csv")
    assert summary.sink_prompts_excluded[0] == 1 and summary.entropy_prompts_excluded[0] == 2
    assert summary.sink_rate[0] == sink_rate(run).sink_rate[1] and np.isnan(summary.mean_entropy[0])
    grid = pd.DataFrame([[1.0, np.inf], [np.nan, 4.0]], index=[0, 1], columns=[0, 1])
    fig = figures.heatmap(grid, title="t", x_title="pos", value="v", log=True)
    marks = [t for t in fig.data if t.name == "NaN / inf"]
    assert len(marks) == 1 and sorted(marks[0].text) == ["inf", "n/a"]


@pytest.mark.embedded
def test_gemma3_in_float16_overflows_and_says_so(tmp_path, capsys):
    """The case that once passed silently: residuals of Gemma 3 270M overflow float16."""
    args = ["run", "--model", "gemma3-270m", "--dtype", "float16", "--quiet",
            "--prompt", "The cat sat on the mat.", "--prompt", "Paris is in France."]
    assert main([*args, "--out", str(tmp_path / "f16"), "--strict"]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert err.count("tokenprobe: warning:") == 1 and "bfloat16 or float32" in err
    run = open_run(tmp_path / "f16")
    assert (run.nonfinite.n_inf > 0).any()
    excluded = run.meta["summary"]["sinks"]["prompts_excluded"]
    assert excluded == run.heads[run.heads.sink_mass.isna()].prompt_id.nunique() > 0
