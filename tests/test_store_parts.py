"""The partitioned run store: part files per table, lazy opening, the lock, crash repair at
every step of finishing and publishing, and a resume key that tells prompt lists apart."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow.dataset as ds
import pytest

import tokenprobe
from tokenprobe import rundir, store
from tokenprobe.cli.args import EXIT_EXISTS
from tokenprobe.cli.main import main
from tokenprobe.probes.activations import ActivationsProbe
from tokenprobe.query import query
from tokenprobe.store import (InvalidRunError, RunLockedError, RunNotFoundError, RunWriter,
                              staging_dir)

PROMPTS = [f"prompt number {i} " * (i % 3 + 1) for i in range(7)]


class Crash(Exception):
    """Stands for the process dying at a chosen step."""


def fresh(tiny_llama, **kw):
    return tokenprobe.run(tiny_llama, PROMPTS, window=3, progress=False, **kw)


def assert_same(a, b):
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], obj=name)


def test_each_table_is_a_directory_of_parts_in_prompt_order(tiny_llama, tmp_path):
    run = fresh(tiny_llama, out=tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["format"] == 2 and meta["parts"]["tokens"] == 3  # windows of 3 of 7 prompts
    assert sorted(p.name for p in (tmp_path / "r" / "tokens").iterdir()) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert not (tmp_path / "r" / "_parts").exists() and not (tmp_path / "r" / "request.json").exists()
    tokens = run.tokens
    assert tokens.prompt_id.is_monotonic_increasing  # parts in order, each sorted by its keys
    assert_same(run, fresh(tiny_llama))  # the same tables as the run kept in memory


def test_open_run_reads_no_table_until_asked(tiny_llama, tmp_path):
    fresh(tiny_llama, out=tmp_path / "r")
    (tmp_path / "r" / "tokens" / "part-000002.parquet").write_bytes(b"PAR1 broken PAR1")
    run = tokenprobe.open_run(tmp_path / "r")  # a damaged later part is not read yet
    assert len(run.prompts) == 7 and "tokens" in run.tables
    assert run.df("heads", columns=["layer"], filter=ds.field("prompt_id") == 1).layer.nunique() \
        == run.meta["n_layers"]
    with pytest.raises(InvalidRunError, match=f"{tmp_path / 'r'}: table tokens .*not readable"):
        run.tokens


def test_select_reads_only_the_prompts_asked_for(tiny_llama, tmp_path):
    run = fresh(tiny_llama, out=tmp_path / "r")
    one = run.select([4])
    assert set(one.tokens.prompt_id) == {4} and set(one.heads.prompt_id) == {4}
    pd.testing.assert_frame_equal(one.tokens, run.tokens[run.tokens.prompt_id == 4]
                                  .reset_index(drop=True))


def test_runs_written_before_parts_still_open_and_query(tiny_llama, tmp_path):
    """The one-file-per-table layout (run.json without "format")."""
    run = fresh(tiny_llama)
    old = tmp_path / "old"
    old.mkdir()
    for name in run.tables:
        run.tables[name].to_parquet(old / f"{name}.parquet", index=False)
    (old / "run.json").write_text(json.dumps({"status": "complete", "model": "tiny-llama",
                                              "tables": sorted(run.tables)}))
    assert_same(tokenprobe.open_run(old), run)
    assert query("SELECT count(*) AS n FROM tokens", [old]).n[0] == len(run.tokens)


def test_a_second_writer_of_the_same_run_is_refused(tiny_llama, tmp_path, capsys):
    target = tmp_path / "r"
    with RunWriter(target, model=tiny_llama.model, name="m", fingerprint="f", settings={}):
        with pytest.raises(RunLockedError, match=f"{target} is being written by another process"):
            RunWriter(target, model=tiny_llama.model, name="m", fingerprint="f", settings={})
        code = main(["run", "--model", "tiny-llama", "--prompt", "the cat", "--out", str(target),
                     "--quiet"])
        assert code == EXIT_EXISTS
        assert "is being written by another process" in capsys.readouterr().err
    fresh(tiny_llama, out=target)  # the lock is let go with the writer
    assert tokenprobe.open_run(target).meta["n_prompts"] == 7


def test_the_lock_is_let_go_when_a_run_fails(tiny_llama, tmp_path):
    with pytest.raises(tokenprobe.tokens.PromptError):
        tokenprobe.run(tiny_llama, ["fine", " "], out=tmp_path / "r", progress=False)
    fresh(tiny_llama, out=tmp_path / "r")


@pytest.mark.parametrize("step", ["finalize", "run_json", "publish_swap", "cleanup"])
def test_a_crash_while_finishing_is_repaired_by_running_again(tiny_llama, tmp_path,
                                                              monkeypatch, step):
    target = tmp_path / "r"
    fresh(tiny_llama, out=target)  # an old run, replaced with --overwrite
    other = {"batch_size": 2}
    real_write, real_rename, real_remove = rundir.write_table, rundir.Path.rename, store.remove

    def crash_write(frame, file):  # the second part rewritten by finalize
        if file.parent.parent == staging_dir(target) and file.name == "part-000001.parquet" \
                and "mean_entropy" in frame:
            raise Crash
        real_write(frame, file)

    real_json = store.write_json

    def crash_json(data, file):
        if file.name == "run.json":
            raise Crash
        real_json(data, file)

    def crash_rename(self, to):  # after the old run is moved aside, before the new moves in
        if self == staging_dir(target):
            raise Crash
        return real_rename(self, to)

    def crash_remove(path):
        if path.name in ("_parts", "request.json"):
            raise Crash
        real_remove(path)

    if step == "finalize":
        monkeypatch.setattr(store, "write_table", crash_write)
    elif step == "run_json":
        monkeypatch.setattr(store, "write_json", crash_json)
    elif step == "publish_swap":
        monkeypatch.setattr(rundir.Path, "rename", crash_rename)
    else:
        monkeypatch.setattr(store, "remove", crash_remove)
    with pytest.raises(Crash):
        fresh(tiny_llama, out=target, overwrite=True, **other)
    monkeypatch.undo()
    if step == "publish_swap":  # the old run is not hidden: reading says where it is
        with pytest.raises(RunNotFoundError, match="interrupted --overwrite"):
            tokenprobe.open_run(target)
    again = fresh(tiny_llama, out=target, overwrite=True, **other)
    assert_same(again, fresh(tiny_llama, **other))
    assert_same(tokenprobe.open_run(target), again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.lock", "r"]


def test_an_interrupted_publish_without_a_new_run_puts_the_old_one_back(tiny_llama, tmp_path):
    target = tmp_path / "r"
    fresh(tiny_llama, out=target)
    target.rename(rundir.old_dir(target))  # as if publish died before the new run moved in
    shutil.rmtree(staging_dir(target), ignore_errors=True)
    with pytest.raises(store.RunExistsError):  # recovered: the old run is back, and kept
        fresh(tiny_llama, out=target)
    assert tokenprobe.open_run(target).meta["n_prompts"] == 7


def test_the_resume_key_tells_prompt_lists_apart(tiny_llama, tmp_path):
    target = tmp_path / "r"

    class Stop(Exception):
        pass

    def stream(texts, stop_at=None):
        for i, text in enumerate(texts):
            if i == stop_at:
                raise Stop
            yield text

    for staged, other in [(["p\x00q", "r"], ["p", "q\x00r"]), (["pq", "r"], ["p", "qr"])]:
        with pytest.raises(Stop):  # one window of two prompts staged...
            tokenprobe.run(tiny_llama, stream([*staged, "s"], stop_at=2), window=2, out=target,
                           progress=False)
        with pytest.raises(FileExistsError, match="other prompts"):  # ...never resumes another
            tokenprobe.run(tiny_llama, iter([*other, "s"]), window=2, out=target,
                           progress=False)
        shutil.rmtree(staging_dir(target))
    with pytest.raises(Stop):  # a list is a settings key: the same holds
        tokenprobe.run(tiny_llama, ["p\x00q"], [StopAfter(Stop)], out=target, progress=False)
    with pytest.raises(FileExistsError, match="different settings"):
        tokenprobe.run(tiny_llama, ["p", "q"], ["activations"], out=target, progress=False)


class StopAfter(ActivationsProbe):
    """The activations probe, raising `error` at finish (after the parts are written)."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def statistics(self, sql):
        raise self.error


def test_a_shorter_stream_does_not_resume_a_longer_run(tiny_llama, tmp_path):
    target = tmp_path / "r"
    with pytest.raises(KeyError):
        tokenprobe.run(tiny_llama, iter(PROMPTS), [StopAfter(KeyError("x"))], window=2,
                       out=target, progress=False)
    with pytest.raises(FileExistsError, match="past the end"):
        tokenprobe.run(tiny_llama, iter(PROMPTS[:4]), [StopAfter(KeyError("x"))], window=2,
                       out=target, progress=False)


def test_parts_sql_views_are_private_to_each_instance():
    """Two PartsSQL open at once (one process database, a connection each) see only their own
    tables registered from memory."""
    from tokenprobe.store import PartsSQL

    first = PartsSQL(frames={"tokens": pd.DataFrame({"x": [1, 2]})})
    second = PartsSQL(frames={"tokens": pd.DataFrame({"x": [10, 20, 30]})})
    try:
        assert first.sql("SELECT sum(x) AS s FROM tokens").s.iloc[0] == 3
        assert second.sql("SELECT sum(x) AS s FROM tokens").s.iloc[0] == 60
    finally:
        first.close(), second.close()


def test_parts_sql_file_views_do_not_collide(tmp_path):
    """The same for views over part files: each instance's are temporary, its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenprobe.store import PartsSQL

    paths = []
    for i, values in enumerate(([1, 2], [10, 20, 30])):
        paths.append(tmp_path / f"{i}.parquet")
        pq.write_table(pa.table({"x": values}), paths[-1])
    first, second = PartsSQL(files={"tokens": [paths[0]]}), PartsSQL(files={"tokens": [paths[1]]})
    try:
        assert first.sql("SELECT sum(x) AS s FROM tokens").s.iloc[0] == 3
        assert second.sql("SELECT sum(x) AS s FROM tokens").s.iloc[0] == 60
        assert first.columns("tokens") == ["x"]
    finally:
        first.close(), second.close()
    again = PartsSQL(files={"tokens": [paths[1]]})  # a closed instance's views are gone
    again.close()
