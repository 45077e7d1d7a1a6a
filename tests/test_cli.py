"""The command line: runs, summaries, queries, listings and exit codes for each failure."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import tokenprobe
from tokenprobe.cli.args import EXIT_EXISTS, EXIT_MODEL, EXIT_OK, EXIT_USAGE
from tokenprobe.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_a_run_and_prints_a_summary(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "line one\nline two"}) + "\n" + json.dumps("second") + "\n")
    code, out, _ = run_cli(capsys, "run", "--model", "tiny-llama", "--prompts", str(prompts),
                           "--prompt", "third", "--out", str(tmp_path / "r"), "--quiet")
    assert code == EXIT_OK
    run = tokenprobe.open_run(tmp_path / "r")
    # --prompt texts come first, then each --prompts file in order
    assert run.prompts.text.tolist() == ["third", "line one\nline two", "second"]
    assert "3 prompt(s)" in out and "no massive activations" in out
    assert out.count("sink rate") == 3 and "secondary sinks:" in out
    assert out.count("self-certainty") == 3 and "forking:" in out
    assert f"run saved to {tmp_path / 'r'}" in out


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_run_through_other_backends(capsys, tmp_path, backend):
    code, _, _ = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "abc", "--backend",
                         backend, "--out", str(tmp_path / "r"), "--quiet")
    assert code == EXIT_OK
    run = tokenprobe.open_run(tmp_path / "r")
    assert run.meta["backend"] == {"bridge": "transformer_bridge", "nnsight": "nnsight"}[backend]
    assert run.tokens.token.tolist() == ["a", "b", "c"]


def test_error_exit_codes(capsys, tmp_path):
    out = str(tmp_path / "r")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    cases = [
        (["--model", "no-such-model", "--prompt", "x"], EXIT_MODEL, "unknown model"),
        (["--prompt", "   "], EXIT_USAGE, "empty or whitespace"),
        (["--prompts", str(tmp_path / "missing.txt")], EXIT_USAGE, "missing.txt does not exist"),
        (["--prompts", str(bad)], EXIT_USAGE, "is not UTF-8"),
        (["--prompts", str(blank)], EXIT_USAGE, "hold no prompts"),
        (["--probes", "nope", "--prompt", "x"], EXIT_USAGE, "unknown probe 'nope'"),
        (["--probes", "sinks", "--lens", "--prompt", "x"], EXIT_USAGE, "add it to --probes"),
        (["--contrast-beta", "1", "--prompt", "x"], EXIT_USAGE, "needs --compare"),
        (["--compare", "tiny-gemma3-nope", "--prompt", "x"], EXIT_MODEL, "unknown model"),
        ([], EXIT_USAGE, "give prompts"),
    ]
    for args, code, message in cases:
        got, _, err = run_cli(capsys, "run", "--model", "tiny-llama", *args, "--out", out)
        assert (got, message in err) == (code, True), (args, err)
    assert run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "x", "--out", out)[0] == 0
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "y", "--out", out)
    assert code == EXIT_EXISTS and "already holds a complete run" in err
    assert tokenprobe.open_run(out).prompts.text.tolist() == ["x"]


def test_query_and_models(capsys, tmp_path):
    run_cli(capsys, "run", "--model", "tiny-gemma3", "--prompt", "hey", "--out",
            str(tmp_path / "r"), "--quiet")
    code, out, _ = run_cli(capsys, "query", "SELECT token FROM tokens ORDER BY pos",
                           str(tmp_path / "r"), "--format", "csv")
    assert code == 0 and out.split() == ["token", "<bos>", "h", "e", "y"]
    run_cli(capsys, "run", "--model", "tiny-llama", "--prompt", "a b", "--out",
            str(tmp_path / "s"), "--quiet")
    code, out, _ = run_cli(capsys, "query", "SELECT pos, token FROM tokens", str(tmp_path / "s"))
    assert code == 0 and "'a'" in out and "' '" in out  # the space token is visible
    code, _, err = run_cli(capsys, "query", "SELECT nope FROM tokens", str(tmp_path / "r"))
    assert code == EXIT_USAGE and "SQL error" in err
    code, _, err = run_cli(capsys, "query", "SELECT 1", str(tmp_path))
    assert code == EXIT_USAGE and "not a complete tokenprobe run" in err
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out
    assert [line.split()[1:6] for line in out.splitlines() if line.startswith("tiny-llama")] == [
        ["3", "4", "2", "64", "259"]]


def test_installed_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "tokenprobe.cli", "run", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--prompts SOURCE" in done.stdout and "exit codes" in done.stdout
    top = subprocess.run([sys.executable, "-m", "tokenprobe.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "heads" in top and "toy" in top and "query" in top
    heads = subprocess.run([sys.executable, "-m", "tokenprobe.cli", "heads", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "--method {zero,sink}" in heads


def test_max_tokens_and_sinks_only(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--model", "tiny-gemma3", "--probes", "sinks",
                           "--prompt", "a long enough prompt", "--max-tokens", "6", "--out",
                           str(tmp_path / "r"), "--quiet")
    assert code == 0 and "T=6)" in out and "massive" not in out
    run = tokenprobe.open_run(tmp_path / "r")
    assert run.prompts.n_tokens.tolist() == [6] and sorted(run.tables) == [
        "heads", "nonfinite", "prompts", "sink_labels", "sinks", "token_layers", "tokens"]
    code, _, err = run_cli(capsys, "run", "--model", "tiny-llama", "--probes", "sinks",
                           "--backend", "nnsight", "--prompt", "x", "--out", str(tmp_path / "n"))
    assert code == EXIT_USAGE and "probe sinks needs attention statistics" in err


def test_compare_contrast_and_lens(capsys, tmp_path):
    """A model compared with itself: KL and JSD vanish, and cDPO's score with beta = 1,
    softmax(2 z - z)[y], is the model's own probability of the token."""
    code, out, _ = run_cli(capsys, "run", "--model", "tiny-llama", "--compare", "tiny-llama",
                           "--contrast-beta", "1", "--lens", "--probes", "entropy",
                           "--prompt", "the cat sat", "--out", str(tmp_path / "r"), "--quiet")
    assert code == EXIT_OK, out
    assert "mean JSD to tiny-llama 0.000" in out
    tokens = tokenprobe.open_run(tmp_path / "r").tokens.dropna(subset=["entropy"])
    assert tokens.jsd.abs().max() < 1e-6 and tokens.kl_student_teacher.abs().max() < 1e-5
    assert (tokens.critical_ce - tokens.logprob.map(math.exp)).abs().max() < 1e-5
    assert (tokens.teacher_entropy - tokens.entropy).abs().max() < 1e-5
    run = tokenprobe.open_run(tmp_path / "r")
    layers = run.token_layers
    assert layers.layer.nunique() == run.meta["n_layers"] and layers.lens_entropy.notna().any()


@pytest.mark.parametrize("module, argv, expected", [
    ("tokenprobe.cli.run:cmd_run", ["run", "--prompt", "x", "--out", "r"],
     "interrupted; finished batches are kept, run the same command again to resume"),
    ("tokenprobe.analyses.critical.cli:cmd_critical", ["critical", "--out", "r"],
     "interrupted; finished prefixes are kept, run the same command again to resume"),
    ("tokenprobe.analyses.attribution_cli:cmd_attribute",
     ["attribute", "--prompt", "x", "--out", "r"], "interrupted; nothing was written"),
    ("tokenprobe.analyses.report_cli:cmd_report", ["report", "r", "--out", "o"],
     "interrupted; nothing was written"),
])
def test_ctrl_c_says_what_is_kept(monkeypatch, capsys, module, argv, expected):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    name, attr = module.split(":")
    monkeypatch.setattr(importlib.import_module(name), attr, interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(expected)


def test_compare_over_another_vocabulary_is_refused_before_any_model_loads(capsys, tmp_path,
                                                                             monkeypatch):
    """smollm2-135m (49152 tokens) and gemma3-270m (262144) cannot give the two-model columns:
    said at once, from the models' configs, instead of after loading both."""
    loaded = []
    monkeypatch.setattr(tokenprobe, "load", lambda name, **kw: loaded.append(name))
    code, _, err = run_cli(capsys, "run", "--model", "smollm2-135m", "--compare", "gemma3-270m",
                           "--prompt", "x", "--out", str(tmp_path / "r"))
    assert code == EXIT_USAGE and "vocabulary of 262144 tokens" in err and "49152" in err
    assert loaded == [] and not (tmp_path / "r").exists()
