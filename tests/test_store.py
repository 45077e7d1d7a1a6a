"""The run store: Parquet round trips, no silent overwrite, atomic publish, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import tokenprobe
from tokenprobe.probes.activations import ActivationsProbe
from tokenprobe.store import (InvalidRunError, Run, RunExistsError, RunNotFoundError,
                              staging_dir, table_files)

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
    assert sorted(back.tables) == ["massive", "nonfinite", "prompts", "token_layers", "tokens"]
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
    before = (target / "tokens" / "part-000000.parquet").read_bytes()
    with pytest.raises(RunExistsError):
        tokenprobe.run(tiny_llama, PROMPTS[:2], out=target, progress=False)
    assert (target / "tokens" / "part-000000.parquet").read_bytes() == before
    tokenprobe.run(tiny_llama, PROMPTS[:2], out=target, overwrite=True, progress=False)
    assert len(tokenprobe.open_run(target).prompts) == 2


def test_interrupted_run_publishes_nothing_then_resumes(tiny_llama, tmp_path):
    target = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):  # windows of 2 prompts: prompt 4 is in the third
        tokenprobe.run(tiny_llama, PROMPTS, [InterruptAt(4)], window=2, out=target,
                       progress=False)
    assert not target.exists()
    with pytest.raises(RunNotFoundError, match="run the same command again to resume"):
        tokenprobe.open_run(target)
    assert len(list((staging_dir(target) / "_parts").glob("0*.json"))) == 2
    recorder = Recording()
    resumed = tokenprobe.run(tiny_llama, PROMPTS, [recorder], window=2, out=target,
                             progress=False)
    assert sorted(recorder.seen) == [4, 5, 6]  # the two finished windows were not rerun
    assert not staging_dir(target).exists()
    whole = tokenprobe.run(tiny_llama, PROMPTS, ["activations"], window=2, progress=False)
    for name in whole.tables:
        pd.testing.assert_frame_equal(resumed.tables[name], whole.tables[name])


def test_partial_run_with_other_settings_is_refused(tiny_llama, tmp_path):
    target = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        tokenprobe.run(tiny_llama, PROMPTS, [InterruptAt(6)], window=2, out=target,
                       progress=False)
    with pytest.raises(FileExistsError, match="different settings"):
        tokenprobe.run(tiny_llama, PROMPTS[:3], window=2, out=target, progress=False)


def test_non_run_directory_is_not_written_into(tiny_llama, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tokenprobe run"):
        tokenprobe.run(tiny_llama, PROMPTS[:1], out=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


# ---- run files are data, never paths -------------------------------------------------------

def small_run(directory: Path) -> Path:
    """A hand-made run (prompts and tokens) saved to `directory`."""
    return Run({"prompts": pd.DataFrame({"prompt_id": [0], "text": ["hi"], "n_tokens": [2]}),
                "tokens": pd.DataFrame({"prompt_id": [0, 0], "pos": [0, 1],
                                        "token": ["h", "i"]})},
               {"model": "hand-made"}).save(directory)


def set_tables(run: Path, tables: object) -> None:
    meta = json.loads((run / "run.json").read_text())
    if tables is None:
        del meta["tables"]
    else:
        meta["tables"] = tables
    (run / "run.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("tables, message", [
    (["../../outside/secret/prompts"], "never a path"),
    (["prompts", "../../outside/secret/prompts"], "never a path"),
    (["/etc/passwd"], "never a path"),
    (["tokens.parquet"], "never a path"),
    (["Tokens"], "never a path"),
    (["tok ens"], "never a path"),
    ([""], "never a path"),
    ("tokens", "must be a list of table names"),
    ([["tokens"]], "must be a list of table names"),
    ([1], "must be a list of table names"),
    ({"tokens": "../x"}, "must be a list of table names"),
    (None, "must be a list of table names"),
])
def test_open_run_refuses_table_names_that_are_not_identifiers(tmp_path, tables, message):
    run = small_run(tmp_path / "root" / "run")
    secret = tmp_path / "outside" / "secret"
    secret.mkdir(parents=True)
    pd.DataFrame({"prompt_id": [0], "text": ["TOP SECRET"], "n_tokens": [1]}).to_parquet(
        secret / "prompts.parquet")
    set_tables(run, tables)
    with pytest.raises(InvalidRunError, match=message):
        tokenprobe.open_run(run)
    with pytest.raises(InvalidRunError, match=message):
        table_files(run)
    assert issubclass(InvalidRunError, RunNotFoundError)  # the CLI's exit 2, the app's message


def test_open_run_refuses_a_table_file_linked_outside_the_run(tmp_path):
    run = small_run(tmp_path / "run")
    outside = tmp_path / "secret.parquet"
    pd.DataFrame({"prompt_id": [0], "pos": [0], "token": ["TOP SECRET"]}).to_parquet(outside)
    (run / "tokens" / "part-000000.parquet").unlink()
    (run / "tokens" / "part-000000.parquet").symlink_to(outside)
    with pytest.raises(InvalidRunError, match="outside the run directory"):
        tokenprobe.open_run(run)
    (run / "tokens" / "part-000000.parquet").unlink()  # the table's folder itself linked
    (run / "tokens").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "part-000000.parquet").symlink_to(outside)
    (run / "tokens").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidRunError, match="outside the run directory"):
        tokenprobe.open_run(run)


def test_links_inside_the_run_and_a_linked_run_directory_still_open(tmp_path):
    run = small_run(tmp_path / "run")
    (run / "data").mkdir()
    part = run / "tokens" / "part-000000.parquet"
    part.rename(run / "data" / "tokens.parquet")
    part.symlink_to(run / "data" / "tokens.parquet")
    (tmp_path / "alias").symlink_to(run)
    assert tokenprobe.open_run(tmp_path / "alias").tokens.token.tolist() == ["h", "i"]
    assert table_files(tmp_path / "alias")["tokens"] == [(run / "data" / "tokens.parquet").resolve()]


def test_open_run_names_a_missing_or_unreadable_table(tmp_path):
    run = small_run(tmp_path / "run")
    part = run / "tokens" / "part-000000.parquet"
    part.write_bytes(b"not parquet")
    with pytest.raises(InvalidRunError, match="tokens .*not a readable Parquet file"):
        tokenprobe.open_run(run)
    part.unlink()
    with pytest.raises(InvalidRunError, match="'tokens' with 1 part file.* holds 0"):
        tokenprobe.open_run(run)
    (run / "tokens").rmdir()
    with pytest.raises(InvalidRunError, match="lists table 'tokens' but its files .* missing"):
        tokenprobe.open_run(run)


def test_a_run_json_that_is_not_an_object_is_not_a_run(tmp_path):
    run = small_run(tmp_path / "run")
    (run / "run.json").write_text('["status", "complete"]')
    with pytest.raises(RunNotFoundError, match="not a complete tokenprobe run"):
        tokenprobe.open_run(run)


def test_save_refuses_table_names_that_are_not_identifiers(tmp_path):
    frame = pd.DataFrame({"x": [1]})
    with pytest.raises(ValueError, match="not identifiers"):
        Run({"../escaped": frame}, {}).save(tmp_path / "runs" / "r")
    assert not (tmp_path / "runs" / "escaped.parquet").exists()
    assert not (tmp_path / "runs" / "r").exists()


def test_cli_exits_2_on_an_unsafe_run(tmp_path, capsys):
    from tokenprobe.cli.args import EXIT_USAGE
    from tokenprobe.cli.main import main

    run = small_run(tmp_path / "run")
    set_tables(run, ["../../etc/passwd"])
    assert main(["query", "SELECT 1", str(run)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "never a path" in err and err.count("\n") == 1


def test_save_keeps_a_resumable_run_staged_at_the_same_target(tmp_path, tiny_llama):
    """Run.save (attribute, counterfactual) stages in a directory of its own: an interrupted
    `tokenprobe run` checkpointed at the same --out is never deleted."""
    import tokenprobe
    from tokenprobe.store import staging_dir

    target = tmp_path / "r"
    checkpoint = staging_dir(target) / "tokens"
    checkpoint.mkdir(parents=True)
    (checkpoint / "part-000000.parquet").write_bytes(b"a finished window")
    tokenprobe.run(tiny_llama, ["a b"], ["activations"], progress=False).save(target)
    assert (checkpoint / "part-000000.parquet").read_bytes() == b"a finished window"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.partial", "r"]


def test_join_and_conform_keep_rows_types_and_inputs():
    """join puts two probes' columns of one table side by side on its keys: the same rows in
    the same order (the hooks' usual case), in another order, or only partly shared; conform
    gives the declared dtypes and never changes its input."""
    from tokenprobe.tables import conform, join

    keys = {"prompt_id": [0, 0, 1], "layer": [0, 1, 0], "pos": [0, 0, 0]}
    left = pd.DataFrame({**keys, "resid_norm": [1.0, 2.0, 3.0]})
    right = pd.DataFrame({**keys, "attn_received": [0.1, 0.2, 0.3]})
    want = pd.DataFrame({**keys, "resid_norm": [1.0, 2.0, 3.0], "attn_received": [0.1, 0.2, 0.3]})
    want = conform("token_layers", want)
    for other in (right, right.iloc[::-1]):
        got = join("token_layers", left, other).sort_values(["prompt_id", "layer", "pos"],
                                                            ignore_index=True)
        pd.testing.assert_frame_equal(got, want)
    partial = join("token_layers", left, right.iloc[1:]).sort_values(
        ["prompt_id", "layer", "pos"], ignore_index=True)
    assert partial.attn_received.isna().tolist() == [True, False, False]
    ints = pd.DataFrame({**keys, "max_abs_dim": [1.0, 2.0, 3.0]})
    assert str(conform("token_layers", ints).max_abs_dim.dtype) == "int64"
    assert ints.max_abs_dim.dtype == "float64"  # the input as it was
    empty = conform("token_layers", None)
    empty["added"] = []  # a caller's change to an empty table stays its own
    assert "added" not in conform("token_layers", None).columns
