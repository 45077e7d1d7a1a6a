"""The run writer: every command that writes a run does it through `RunWriter`, which owns the
run's metadata, its parts, the lock, resume and publishing; the layout it writes and `open_run`
are in `tokenprobe.rundir`.

While a run is written its parts go to a staging directory `.<name>.partial` beside the target:
each part's table files (atomic renames) and then its marker `_parts/NNNNNN.json`; a part
counts as done once its marker is there, so a run interrupted and started again with the same
settings resumes after the parts it finished. `finish` adds the run-level columns part by part
(never merging a table in memory), writes run.json and renames the staging directory into
place. A lock file `.<name>.lock` beside the target keeps a second process from writing the
same run; a crash at any step is repaired by running the same command again.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import pandas as pd

from tokenprobe.rundir import (FORMAT, TABLE_NAME, InvalidRunError, Run, Tables,  # noqa: F401
                               open_run, part_index, part_name, read_files, table_files,
                               write_json, write_table)
from tokenprobe.run_target import (RUN_JSON, OutputNotWritableError, RunExistsError,  # noqa: F401
                                   RunLockedError, RunNotFoundError, check_target,
                                   check_writable, is_complete, publish, recover, remove,
                                   staging_dir)
from tokenprobe.tables import conform, merge_parts

__all__ = ["FORMAT", "RUN_JSON", "TABLE_NAME", "InvalidRunError", "OutputNotWritableError",
           "PartsSQL", "Run", "RunExistsError", "RunLockedError", "RunNotFoundError", "RunWriter",
           "Tables", "check_target", "check_writable", "is_complete", "model_meta",
           "open_run", "package_versions", "part_index", "prompt_tables", "provenance",
           "publish", "read_files", "recover", "staging_dir", "table_files"]
MARKERS = "_parts"  # in the staging dir: one JSON marker per finished part


VERSIONED = ("tokenprobe", "torch", "transformers", "pandas", "pyarrow", "transformer-lens",
             "nnsight")


def package_versions() -> dict[str, str]:
    """Installed versions of tokenprobe and the packages that shape its numbers."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def provenance() -> dict[str, object]:
    """What every run.json records of how it was made: package versions and the UTC time."""
    return {"versions": package_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def model_meta(model, name: str, fingerprint: str) -> dict:
    """What a run records of the transformers model it ran: name, weights fingerprint,
    architecture, sizes, dtype and device (with a device_map: which modules sit where)."""
    from tokenprobe.placement import placement_meta

    config, weight = model.config, next(model.parameters())
    return {"model": name, "weights_fingerprint": fingerprint,
            "architecture": type(model).__name__, "n_layers": config.num_hidden_layers,
            "d_model": config.hidden_size, "vocab_size": config.vocab_size,
            "dtype": str(weight.dtype).removeprefix("torch."), **placement_meta(model)}


def prompt_tables(tokenizer, rows: list[tuple], doc_ids: list[str | None] | None = None
                  ) -> dict[str, pd.DataFrame]:
    """The `prompts` and `tokens` rows of prompts given as (prompt_id, text, token ids,
    truncated[, response_start]), with the corpus' `doc_ids` when it has them: what every run
    holds of its text. Columns `response_start` and `in_response` appear when a prompt has a
    response (a response_start that is not None)."""
    from tokenprobe.tokens import token_rows

    special = set(tokenizer.all_special_ids)
    starts = [row[4] if len(row) > 4 else None for row in rows]
    prompts = pd.DataFrame(
        [(i, text, len(ids), truncated, bool(ids) and ids[0] in special)
         for i, text, ids, truncated, *_ in rows],
        columns=["prompt_id", "text", "n_tokens", "truncated", "first_is_special"])
    if doc_ids is not None:
        prompts["doc_id"] = pd.Series(doc_ids, dtype="string")
    tokens = token_rows(tokenizer, [(row[0], row[2]) for row in rows])
    if any(start is not None for start in starts):
        prompts["response_start"] = pd.array(starts, dtype="Int64")
        start = prompts["response_start"].repeat(prompts["n_tokens"]).array  # per token
        tokens["in_response"] = pd.array(tokens["pos"].to_numpy() >= start, dtype="boolean")
    return {"prompts": conform("prompts", prompts), "tokens": conform("tokens", tokens)}




_DATABASE: tuple[int, object] | None = None  # (process id, its in-memory DuckDB database)
_DATABASE_LOCK = threading.Lock()


def _database():
    """This process's in-memory DuckDB database, opened at first use (again in a forked child,
    which must not use its parent's)."""
    import duckdb

    global _DATABASE
    with _DATABASE_LOCK:
        if _DATABASE is None or _DATABASE[0] != os.getpid():
            _DATABASE = (os.getpid(), duckdb.connect())
        return _DATABASE[1]


class PartsSQL:
    """SQL over a run's tables while it is finished: a DuckDB view per table over its part
    files (or over the parts held in memory), for the run-level statistics and summaries that
    must not load a table. `sql(query, params)` returns a DataFrame; `columns(table)` lists a
    table's columns (empty if it has none)."""

    def __init__(self, files: dict[str, list[Path]] | None = None,
                 frames: dict[str, pd.DataFrame] | None = None) -> None:
        # A connection of its own to this process's in-memory database (opening a database
        # costs about 30 ms, a connection nothing); its views are temporary: seen by no other.
        self._con = _database().cursor()
        self._columns: dict[str, list[str]] = {}
        for name, found in (files or {}).items():
            listed = ", ".join("'" + str(f).replace("'", "''") + "'" for f in found)
            self._con.execute(f'CREATE TEMP VIEW "{name}" AS SELECT * FROM '
                              f"read_parquet([{listed}], union_by_name = true)")
        for name in files or {}:
            self._columns[name] = [r[0] for r in self._con.execute(
                f'DESCRIBE "{name}"').fetchall()]
        self.register(frames or {})

    def register(self, frames: dict[str, pd.DataFrame]) -> None:
        """Views over tables held in memory (a name registered before now reads the new one)."""
        for name, frame in frames.items():
            self._con.register(name, frame)
            self._columns[name] = [str(c) for c in frame.columns]

    def sql(self, query: str, params: list | None = None) -> pd.DataFrame:
        return self._con.execute(query, params).df()

    def columns(self, table: str) -> list[str]:
        return self._columns.get(table, [])

    def close(self) -> None:
        self._con.close()


def write_part(staging: Path, index: int, tables: dict[str, pd.DataFrame],
               mark: dict | None = None) -> None:
    """Write part `index` of the run staged at `staging` (made by a `RunWriter`): each table's
    file, then the part's marker, each atomically; a try interrupted before its marker does
    not count, and its files are replaced. Other processes of the same run (workers) may call
    it for parts of their own."""
    name = part_name(index)
    for folder in staging.iterdir():  # a table an interrupted try wrote, not this one
        if folder.name not in tables and (folder / name).exists():
            (folder / name).unlink()
    for table, frame in tables.items():
        write_table(conform(table, frame), staging / table / name)
    write_json({"tables": {t: len(f) for t, f in tables.items()}, **(mark or {})},
               staging / MARKERS / f"{index:06d}.json")


Finalize = Callable[[dict[str, pd.DataFrame], dict], dict[str, pd.DataFrame]]


class RunWriter:
    """The one way a run is written: by `tokenprobe.run`, the critical-token search,
    attribution and counterfactual generation. Use it as a context manager (or call `close`):
    it holds the run's lock from construction until `finish` or `close`.

    It owns the run's base metadata (the model, `settings`, provenance), its parts (numbered
    table sets, one per window of prompts, prompt or rollout set, in any order), checkpointing,
    resume and publishing. With `out`, each part is kept in a staging directory
    `.<name>.partial` beside `out` as soon as it is written, a writer made again with the same
    model and settings resumes after the parts already there (`done`), and `finish` publishes
    the run at `out` atomically; nothing is written before the first part. Without `out` the
    parts stay in memory and `finish` returns the run.

    Args:
        out: the run directory, or None for a run kept in memory.
        model, name, fingerprint: the transformers model run (or what `model_meta` says of it,
            for a writer whose model is loaded elsewhere), its name and weights fingerprint.
        settings: what the run computed from, in run.json; with the model they identify the
            run for resume (a staging dir left with other settings is refused, never mixed in).
        meta: more run.json entries that do not identify it (the backend, the device, ...).
        overwrite: allow replacing a complete run at `out`.

    Raises:
        RunLockedError: another process is writing a run at `out`.
        RunExistsError, FileExistsError: `out` is taken (see `check_target`), or a staging dir
            with other settings is there.
    """

    def __init__(self, out: str | os.PathLike | None, *, model, name: str, fingerprint: str,
                 settings: dict, meta: dict | None = None, overwrite: bool = False) -> None:
        described = (model_meta(model, name, fingerprint) if not isinstance(model, dict) else
                     {**model, "model": name, "weights_fingerprint": fingerprint})
        self.meta = {**described, **(meta or {}), **settings, **provenance()}
        self.target = Path(out) if out is not None else None
        self._memory: dict[int, dict[str, pd.DataFrame]] = {}
        self._marks: dict[int, dict] = {}
        self._lock = None
        if self.target is None:
            return
        request = {"model": name, "weights_fingerprint": fingerprint,
                   "dtype": described["dtype"], **settings}
        self.request = json.loads(json.dumps(request, default=str))
        self.staging = staging_dir(self.target)
        self._acquire()
        try:
            recover(self.target)
            check_target(self.target, overwrite=overwrite)
            state = self.staging / "request.json"
            if self.staging.exists() and not state.exists():
                shutil.rmtree(self.staging)  # request.json is written first: nothing finished
            if self.staging.exists():
                previous = json.loads(state.read_text())
                if previous != self.request:
                    raise FileExistsError(
                        f"{self.staging} holds an unfinished run with different settings; run "
                        "the same command as before to resume it, or delete that directory "
                        "(--overwrite does not), or choose another --out")
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        from filelock import FileLock, Timeout

        self.target.parent.mkdir(parents=True, exist_ok=True)
        path = self.target.parent / f".{self.target.name}.lock"
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunLockedError(f"{self.target} is being written by another process (it "
                                 f"holds {path}); wait for it to finish, or choose another "
                                 "--out") from None
        self._lock = lock

    def close(self) -> None:
        """Release the run's lock (what was written stays, to resume)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def done(self) -> set[int]:
        """The parts already written (after a resume: those of the interrupted run too)."""
        if self.target is None:
            return set(self._memory)
        if not (self.staging / MARKERS).exists():
            return set()
        return {int(p.stem) for p in (self.staging / MARKERS).glob("[0-9]*.json")}

    def mark(self, index: int) -> dict:
        """What part `index` was written with (`write`'s `mark`)."""
        if self.target is None:
            return self._marks[index]
        return json.loads((self.staging / MARKERS / f"{index:06d}.json").read_text())

    def write(self, index: int, tables: dict[str, pd.DataFrame], mark: dict | None = None
              ) -> None:
        """Store part `index` (and `mark`, JSON data it is checked against on resume); on disk
        it counts as done only once all its tables are (its marker is written last)."""
        if self.target is None:
            self._memory[index], self._marks[index] = tables, dict(mark or {})
            return
        self._stage()
        write_part(self.staging, index, tables, mark)

    def _stage(self) -> None:
        """Make the staging dir (with the first part: before it, nothing is written; workers
        that write parts with `write_part` need it made first)."""
        if not (self.staging / MARKERS).exists():
            self.staging.mkdir(parents=True, exist_ok=True)
            write_json(self.request, self.staging / "request.json")  # first: see __init__
            (self.staging / MARKERS).mkdir()

    def read(self, index: int, name: str) -> pd.DataFrame:
        """Table `name` of part `index`, as written."""
        if self.target is None:
            return self._memory[index][name]
        return pd.read_parquet(self.staging / name / part_name(index))

    def files(self) -> dict[str, list[Path]]:
        """Each table's part files of the finished parts, in part order."""
        tables = {i: self.mark(i).get("tables", {}) for i in sorted(self.done())}
        names = sorted({t for written in tables.values() for t in written})
        return {n: [self.staging / n / part_name(i) for i, written in tables.items()
                    if n in written] for n in names}

    def finish(self, complete: Callable[[dict], tuple[dict, dict]] | None = None, *,
               statistics: Callable[[PartsSQL], dict] | None = None,
               finalize: Finalize | None = None, rewrites: tuple[str, ...] = (),
               summarize: Callable[[PartsSQL, dict], dict] | None = None) -> Run:
        """Publish the run (with `out`) or return it, in one of two ways.

        Part by part (the runner; memory stays that of one part whatever the run's size):
        `statistics(sql)` computes run-level figures over all parts (DuckDB views, see
        `PartsSQL`), `finalize(tables, stats)` adds the run-level columns to each part's
        `rewrites` tables (each file rewritten atomically: running it again gives the same
        result), and `summarize(sql, stats)` returns more run.json entries (the summary).

        Whole (`complete`, for studies whose runs are small): the parts are merged into one
        table each, `complete(tables)` returns (tables, more run.json entries), and each table
        is written as one part.
        """
        try:
            if complete is not None:
                return self._finish_whole(complete)
            return self._finish_parts(statistics, finalize, rewrites, summarize)
        finally:
            self.close()

    def _finish_parts(self, statistics, finalize, rewrites, summarize) -> Run:
        memory = self.target is None
        done = sorted(self.done())
        if memory:
            names = sorted({n for part in self._memory.values() for n in part})
            frames = {n: merge_parts(n, [self._memory[i].get(n) for i in done]) for n in names}
            sql = PartsSQL(frames=frames)
        else:
            files = self.files()
            sql = PartsSQL(files=files)
        try:
            stats = statistics(sql) if statistics else {}
            if finalize is not None and rewrites:
                if memory:
                    rewritten = {n: conform(n, f) for n, f in finalize(
                        {n: frames[n] for n in rewrites if n in frames}, stats).items()}
                    frames.update(rewritten)
                    sql.register(rewritten)
                else:
                    for index in done:
                        self._rewrite(index, rewrites, finalize, stats)
            extra = summarize(sql, stats) if summarize else {}
        finally:
            sql.close()
        if memory:
            return Run(frames, {**self.meta, **extra, "status": "complete",
                                "tables": sorted(frames)})
        meta = {**self.meta, **extra, "format": FORMAT, "status": "complete",
                "tables": sorted(files), "parts": {n: len(f) for n, f in files.items()}}
        write_json(meta, self.staging / RUN_JSON)
        publish(self.staging, self.target)
        for leftover in (self.target / MARKERS, self.target / "request.json"):
            remove(leftover)
        return open_run(self.target)

    def _rewrite(self, index: int, rewrites: tuple[str, ...], finalize: Finalize,
                 stats: dict) -> None:
        present = [n for n in rewrites if n in self.mark(index)["tables"]]
        tables = {n: pd.read_parquet(self.staging / n / part_name(index)) for n in present}
        for name, frame in finalize(tables, stats).items():
            write_table(conform(name, frame), self.staging / name / part_name(index))

    def _finish_whole(self, complete) -> Run:
        done = sorted(self.done())
        parts = ([self._memory[i] for i in done] if self.target is None else
                 [{n: pd.read_parquet(f) for n, f in self._part_files(i).items()} for i in done])
        names = sorted({n for part in parts for n in part})
        tables, extra = complete({n: merge_parts(n, [p.get(n) for p in parts]) for n in names})
        meta = {**self.meta, **extra}
        if self.target is None:
            return Run(tables, {**meta, "status": "complete", "tables": sorted(tables)})
        final = self.staging / "_final"
        if final.exists():
            shutil.rmtree(final)
        Run(tables, meta).save(final)
        publish(final, self.target)
        shutil.rmtree(self.staging)
        return open_run(self.target)

    def _part_files(self, index: int) -> dict[str, Path]:
        return {n: self.staging / n / part_name(index) for n in self.mark(index)["tables"]}
