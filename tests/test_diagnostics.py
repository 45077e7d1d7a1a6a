"""Measures that say when they mean little: run.json "diagnostics", per probe, on hand-built
cases (settings that make a band impossible, prompts far from the paper's T, too few tokens
for a quantile) and on the embedded models (Gemma 3's cosine criterion marking most tokens)."""
from __future__ import annotations

import pytest

import tokenprobe
from tokenprobe.cli.main import main
from tokenprobe.probes import EntropyConfig, EntropyProbe
from tokenprobe.probes.sinks import SinksConfig, SinksProbe

PARAGRAPH = ("The ferry left the harbour a little after seven, when the fog had thinned enough "
             "for the pilot to see the green light on the breakwater. Most of the passengers "
             "stayed inside, reading or sleeping against the windows.")


def notes(run, probe):
    return " | ".join(run.meta.get("diagnostics", {}).get(probe, []))


def test_an_impossible_secondary_band_and_a_short_t_are_said(tiny_llama):
    L = tiny_llama.model.config.num_hidden_layers
    run = tokenprobe.run(tiny_llama, ["the cat sat on the mat"], ["sinks"], progress=False)
    said = notes(run, "sinks")
    assert f"no secondary sink can exist here: with {L} layers and primary_margin 15" in said
    assert "T = 64; these prompts have" in said
    fitting = SinksProbe(SinksConfig(primary_margin=0, secondary_min=0))
    long_text = " ".join(f"w{i}" for i in range(80))
    run = tokenprobe.run(tiny_llama, [long_text], [fitting], max_tokens=64, progress=False)
    assert "sinks" not in run.meta["diagnostics"]  # the band exists, T = 64: nothing to say


def test_quantiles_over_too_few_tokens_are_said(tiny_llama):
    short = tokenprobe.run(tiny_llama, ["a b c", "d e"], ["entropy"], progress=False)
    assert "rest on 6 scored tokens in the whole run" in notes(short, "entropy")
    long_text = " ".join(f"w{i}" for i in range(60))
    enough = tokenprobe.run(tiny_llama, [long_text, long_text], ["entropy"], progress=False)
    assert "entropy" not in enough.meta["diagnostics"]
    per_prompt = tokenprobe.run(tiny_llama, [long_text, "a b c"],
                                [EntropyProbe(EntropyConfig(quantiles_over="prompt"))],
                                progress=False)
    assert "1 of 2 prompts have under 100 scored tokens" in notes(per_prompt, "entropy")


def test_the_cli_prints_the_diagnostics(tmp_path, capsys):
    assert main(["run", "--model", "tiny-llama", "--prompt", "the cat sat", "--probes", "sinks",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "tokenprobe: note: sinks: no secondary sink can exist here" in err


@pytest.mark.embedded
def test_gemma3s_cosine_criterion_is_flagged_and_smollm2s_is_not(gemma3, smollm2):
    """Gemma 3 270M: 18 layers (no secondary band at the defaults) and massive dims in every
    residual (nearly every token 'primary'); SmolLM2's 30 layers and labels pass."""
    gemma = notes(tokenprobe.run(gemma3, [PARAGRAPH], ["sinks"], progress=False), "sinks")
    assert "with 18 layers and primary_margin 15" in gemma
    assert "are labelled primary sinks" in gemma and "does not separate tokens" in gemma
    smol = notes(tokenprobe.run(smollm2, [PARAGRAPH], ["sinks"], progress=False), "sinks")
    assert "no secondary sink" not in smol and "labelled primary sinks" not in smol
