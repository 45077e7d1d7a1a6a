"""Sink rate and sink levels over runs."""
from __future__ import annotations

import pandas as pd
import pytest

import tokenprobe
from tokenprobe.analyses.sinks import sink_levels, sink_rate
from tokenprobe.probes.sinks import SinksConfig, SinksProbe

TEXTS = ["alpha beta gamma delta epsilon", "one two three", "a much longer line of plain text here"]


def test_sink_rate_per_prompt_and_run(tiny_gemma3):
    run = tokenprobe.run(tiny_gemma3, TEXTS, ["sinks"], max_tokens=12, progress=False)
    per = sink_rate(run)
    heads = run.heads
    for row in per.itertuples():
        mine = heads[heads.prompt_id == row.prompt_id]
        assert row.sink_rate == pytest.approx(100 * (mine.sink_mass > 0.3).mean())
    assert per["T"].tolist() == [12, 12, 12]  # every prompt cut to its first 12 tokens
    whole = sink_rate(run, by_prompt=False, eps=0.1)
    assert whole.sink_rate.item() == pytest.approx(100 * (heads.sink_mass > 0.1).mean())
    assert run.meta["summary"]["sinks"]["sink_rate"] == pytest.approx(
        sink_rate(run, by_prompt=False).sink_rate.item())


def test_sink_levels_group_secondary_sinks(tiny_llama):
    config = SinksConfig(cos_threshold=0.2, primary_margin=1, secondary_min=0)
    runs = [tokenprobe.run(tiny_llama, TEXTS, [SinksProbe(config)], progress=False)
            for _ in range(2)]
    levels = sink_levels(runs, kind="secondary")
    sinks = pd.concat([r.sinks for r in runs])
    secondary = sinks[sinks.kind == "secondary"]
    assert levels.n.sum() == len(secondary) > 0
    counts = secondary.groupby(["creation_layer", "lifetime"]).size()
    for row in levels.itertuples():
        assert counts[(row.creation_layer, row.lifetime)] == row.n
    assert levels.n.is_monotonic_decreasing


def test_sink_levels_need_a_sinks_table(tiny_llama):
    run = tokenprobe.run(tiny_llama, TEXTS[:1], ["activations"], progress=False)
    with pytest.raises(ValueError, match="sinks probe"):
        sink_levels([run])
