"""One run writer: every command that writes a run goes through `tokenprobe.store.RunWriter`,
which gives every run the same base metadata; nothing else assembles a Run."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from tokenprobe import store
from tokenprobe.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model", "weights_fingerprint", "architecture", "n_layers", "d_model", "vocab_size",
        "dtype", "device", "versions", "created", "status", "tables"}
COMMANDS = {
    "run": ["run", "--prompt", "the cat sat"],
    "critical": ["critical", "--limit", "1", "--rollouts", "2", "--max-new-tokens", "4",
                 "--max-trajectory-tokens", "6"],
    "attribute": ["attribute", "--prompt", "the cat sat", "--target", " on"],
    "counterfactual": ["counterfactual", "--prompt", "the cat", "--max-new-tokens", "3",
                       "--intervene", "1=#5"],
}


@pytest.fixture
def writers(monkeypatch):
    """The RunWriters made, with the settings each was given."""
    made = []
    original = store.RunWriter.__init__

    def recording(self, out, **kwargs):
        made.append(kwargs["settings"])
        original(self, out, **kwargs)

    monkeypatch.setattr(store.RunWriter, "__init__", recording)
    return made


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_writes_through_the_run_writer(command, writers, tmp_path):
    out = tmp_path / command
    argv = [*COMMANDS[command], "--model", "tiny-llama", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert len(writers) == 1
    meta = json.loads((out / "run.json").read_text())
    assert BASE <= set(meta) and meta["status"] == "complete"
    assert set(writers[0]) <= set(meta)  # the settings that identify the run are recorded
    assert {"prompts", "tokens"} <= set(meta["tables"])
    assert not list(tmp_path.glob(".*.partial"))  # published, staging gone


def test_nothing_but_the_store_assembles_a_run():
    """No module outside tokenprobe/store.py and rundir.py calls `Run(...)`: every run is made
    by `RunWriter.finish` (or read back by `open_run`)."""
    found = []
    for folder in ("tokenprobe", "probes", "analyses", "app"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in (ROOT / "tokenprobe" / "store.py", ROOT / "tokenprobe" / "rundir.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Run":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_in_memory_and_on_disk_give_the_same_run(tmp_path):
    """The writer's two homes for parts (memory, the staging dir) merge to the same tables."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, vocab_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    parts = {1: pd.DataFrame({"prompt_id": [1], "text": ["b"], "n_tokens": [2]}),
             0: pd.DataFrame({"prompt_id": [0], "text": ["a"], "n_tokens": [1]})}
    runs = []
    for out in (None, tmp_path / "r"):
        writer = store.RunWriter(out, model=model, name="m", fingerprint="f",
                                 settings={"seed": 0})
        for index, frame in parts.items():
            writer.write(index, {"prompts": frame})
        assert writer.done() == {0, 1}
        runs.append(writer.finish())
    memory, disk = runs
    pd.testing.assert_frame_equal(memory.prompts, disk.prompts)
    assert memory.prompts.prompt_id.tolist() == [0, 1]
    pd.testing.assert_frame_equal(store.open_run(tmp_path / "r").prompts, disk.prompts)
