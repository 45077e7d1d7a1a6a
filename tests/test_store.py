"""The run store: Parquet round trips, no silent overwrite, atomic publish, resume."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import tokenprobe
from tokenprobe.probes.activations import ActivationsProbe
from tokenprobe.store import RunExistsError, RunNotFoundError, staging_dir

PROMPTS = [f"prompt number {i} " * (i + 1) for i in range(7)]


class InterruptAt(ActivationsProbe):
    """The activations probe, interrupted (as by Ctrl-C) when it meets `prompt_id`."""

    def __init__(self, prompt_id: int) -> None:
        super().__init__()
        self.prompt_id = prompt_id

    def begin(self, batch):
        if self.prompt_id in batch.prompt_ids:
            raise KeyboardInterrupt
        super().begin(batch)


class Recording(ActivationsProbe):
    """The activations probe, recording which prompts it was run on."""

    seen: list[int]

    def begin(self, batch):
        self.__dict__.setdefault("seen", []).extend(batch.prompt_ids)
        super().begin(batch)


def test_save_open_round_trip(tiny_llama, tmp_path):
    run = tokenprobe.run(tiny_llama, PROMPTS[:2], ["activations"], progress=False)
    run.save(tmp_path / "r")
    back = tokenprobe.open_run(tmp_path / "r")
    assert sorted(back.tables) == ["massive", "prompts", "token_layers", "tokens"]
    for name in back.tables:
        pd.testing.assert_frame_equal(back.tables[name], run.tables[name])
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["status"] == "complete" and meta["model"] == "tiny-llama"
    assert meta["weights_fingerprint"] == tiny_llama.fingerprint
    assert {"torch", "transformers", "tokenprobe"} <= set(meta["versions"])
    assert meta["probes"] == [{"name": "activations", "abs_threshold": 100.0, "median_ratio": 1000.0}]


def test_complete_run_never_overwritten_silently(tiny_llama, tmp_path):
    target = tmp_path / "r"
    tokenprobe.run(tiny_llama, PROMPTS[:1], out=target, progress=False)
    before = (target / "tokens.parquet").read_bytes()
    with pytest.raises(RunExistsError):
        tokenprobe.run(tiny_llama, PROMPTS[:2], out=target, progress=False)
    assert (target / "tokens.parquet").read_bytes() == before
    tokenprobe.run(tiny_llama, PROMPTS[:2], out=target, overwrite=True, progress=False)
    assert len(tokenprobe.open_run(target).prompts) == 2


def test_interrupted_run_publishes_nothing_then_resumes(tiny_llama, tmp_path):
    target = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):  # batches of 2 by length: prompt 4 is in the third
        tokenprobe.run(tiny_llama, PROMPTS, [InterruptAt(4)], batch_size=2, out=target,
                       progress=False)
    assert not target.exists()
    with pytest.raises(RunNotFoundError, match="run the same command again to resume"):
        tokenprobe.open_run(target)
    assert len(list((staging_dir(target) / "parts").glob("0*"))) == 2
    recorder = Recording()
    resumed = tokenprobe.run(tiny_llama, PROMPTS, [recorder], batch_size=2, out=target,
                             progress=False)
    assert sorted(recorder.seen) == [4, 5, 6]  # the two finished batches were not rerun
    assert not staging_dir(target).exists()
    whole = tokenprobe.run(tiny_llama, PROMPTS, ["activations"], batch_size=2, progress=False)
    for name in whole.tables:
        pd.testing.assert_frame_equal(resumed.tables[name], whole.tables[name])


def test_partial_run_with_other_settings_is_refused(tiny_llama, tmp_path):
    target = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        tokenprobe.run(tiny_llama, PROMPTS, [InterruptAt(6)], batch_size=2, out=target,
                       progress=False)
    with pytest.raises(FileExistsError, match="different settings"):
        tokenprobe.run(tiny_llama, PROMPTS[:3], batch_size=2, out=target, progress=False)


def test_non_run_directory_is_not_written_into(tiny_llama, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tokenprobe run"):
        tokenprobe.run(tiny_llama, PROMPTS[:1], out=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
