"""A run on disk: `run.json` (the manifest) and a directory of Parquet part files per table,
read lazily.

Layout of a run directory `R`:

    R/run.json                   metadata; "status": "complete" once every part is in place,
                                 "parts": {table: number of part files}
    R/<table>/part-NNNNNN.parquet  the table's rows, one file per part (a window of prompts),
                                 sorted by the table's keys; read in part order
    R/<table>.parquet            the one-file layout of runs written before parts (still read)

A run's files are data, never paths: the table names `run.json` lists are checked to be
identifiers and every file to lie inside the run directory (`table_files`) before anything
reads them. `open_run` reads only `run.json`; a table is read when it is asked for, whole
(`run.tokens`, `run.df(...)`) or as a pyarrow dataset (`run.dataset(...)`) for scans that
never load it, with column selection and row filters pushed down to the files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pandas as pd

from tokenprobe.run_target import (RUN_JSON, RunNotFoundError, check_target, is_complete,
                                   old_dir, publish, staging_dir)

TABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")  # what a table name in run.json may be
PART_FILE = re.compile(r"part-(\d+)\.parquet")
ROW_GROUP = 65_536  # rows per Parquet row group: scans skip groups by their key statistics
FORMAT = 2  # run.json "format": 2 = a directory of part files per table


class InvalidRunError(RunNotFoundError):
    """A complete-looking run whose run.json or table files cannot be read safely: a table name
    that is not an identifier, or a table file that is missing, unreadable or outside the run
    directory. The message says which."""


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def part_index(file: Path) -> int:
    return int(PART_FILE.fullmatch(file.name).group(1))


def write_table(frame: pd.DataFrame, file: Path) -> None:
    """Write `frame` to `file` atomically (a temporary name in the same directory, renamed)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(file)
    try:
        frame.to_parquet(tmp, index=False, row_group_size=ROW_GROUP)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: dict, file: Path) -> None:
    """Write `data` as JSON to `file` atomically."""
    tmp = temporary(file)
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def temporary(file: Path) -> Path:
    """A name beside `file` of this process and call only: two writers of the same file (a
    Ray window retried while its first try still runs) never write into each other's."""
    return file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class Tables(MutableMapping):
    """A run's tables by name: each read (whole, as a DataFrame) the first time it is asked
    for and kept; `name in tables` and iteration read nothing."""

    def __init__(self, frames: Mapping[str, pd.DataFrame] | None = None,
                 files: Mapping[str, list[Path]] | None = None, where: str = "") -> None:
        self._frames = dict(frames or {})
        self._files = dict(files or {})
        self.where = where  # the run directory, for messages

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._frames:
            if name not in self._files:
                raise KeyError(name)
            self._frames[name] = read_files(self._files[name], name, self.where)
        return self._frames[name]

    def __setitem__(self, name: str, frame: pd.DataFrame) -> None:
        self._frames[name] = frame

    def __delitem__(self, name: str) -> None:
        self._frames.pop(name, None)
        self._files.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._files, *self._frames]))

    def __len__(self) -> int:
        return len(set(self._files) | set(self._frames))

    def __contains__(self, name: object) -> bool:
        return name in self._frames or name in self._files

    def files(self, name: str) -> list[Path] | None:
        """The part files of table `name` not yet read, or None (in memory, or no such table)."""
        return None if name in self._frames else self._files.get(name)


def read_files(files: list[Path], name: str, where: str = "", *,
               columns: list[str] | None = None, filter: Any = None) -> pd.DataFrame:
    """Table `name` from its part `files` as one DataFrame (`columns` and a pyarrow `filter`
    expression pushed down to the files); InvalidRunError when a file cannot be read."""
    import pyarrow.dataset as ds

    try:
        data = ds.dataset([str(f) for f in files], format="parquet")
        return data.to_table(columns=columns, filter=filter).to_pandas()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise InvalidRunError(f"{where}: table {name} ({len(files)} part file(s)) is not "
                              f"readable Parquet: {err}") from err


class Run:
    """A run: metadata (`meta`, run.json) and tables, read lazily from disk.

    `run.tokens` or `run.tables["tokens"]` reads a whole table as a DataFrame (and keeps it);
    `run.df(name, columns=..., filter=...)` reads part of one; `run.dataset(name)` is a
    pyarrow dataset for scans that never load it; `run.select(prompt_ids)` is the same run
    restricted to some prompts (a per-prompt view reads only their row groups). For SQL over
    runs, `tokenprobe.query.connect([run_dir])`.
    """

    def __init__(self, tables: Mapping[str, pd.DataFrame] | Tables, meta: dict) -> None:
        self.tables = tables if isinstance(tables, Tables) else Tables(tables)
        self.meta = meta

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"run has no table {name!r}; tables: {sorted(tables)}")

    def __repr__(self) -> str:
        parts = self.meta.get("parts") or {}
        sizes = ", ".join(f"{k}" + (f"[{parts[k]} parts]" if k in parts else "")
                          for k in self.tables)
        return f"Run(model={self.meta.get('model')!r}, tables: {sizes})"

    def dataset(self, name: str):
        """Table `name` as a `pyarrow.dataset.Dataset` over its files (read nothing yet); a
        table held in memory is wrapped as one."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        self._check(name)
        files = self.tables.files(name)
        if files is None:
            return ds.dataset(pa.Table.from_pandas(self.tables[name], preserve_index=False))
        return ds.dataset([str(f) for f in files], format="parquet")

    def df(self, name: str, *, columns: list[str] | None = None, filter: Any = None
           ) -> pd.DataFrame:
        """Table `name` (its `columns`, the rows where pyarrow expression `filter` holds,
        e.g. `pyarrow.dataset.field("prompt_id") == 3`) as a DataFrame."""
        self._check(name)
        files = self.tables.files(name)
        if files is None:
            frame = self.tables[name]
            if filter is not None:
                frame = self.dataset(name).to_table(filter=filter).to_pandas()
            return frame[columns] if columns else frame
        return read_files(files, name, self.tables.where, columns=columns, filter=filter)

    def select(self, prompt_ids: list[int]) -> Run:
        """This run with only the rows of `prompt_ids` in every table keyed by prompt."""
        import pyarrow.dataset as ds

        wanted = ds.field("prompt_id").isin([int(i) for i in prompt_ids])
        frames = {}
        for name in self.tables:
            frame = self.df(name, filter=wanted) if self._keyed(name) else self.tables[name]
            frames[name] = frame.reset_index(drop=True)
        return Run(frames, self.meta)

    def _keyed(self, name: str) -> bool:
        return "prompt_id" in self.dataset(name).schema.names

    def _check(self, name: str) -> None:
        if name not in self.tables:
            raise KeyError(f"run has no table {name!r}; tables: {sorted(self.tables)}")

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the run to `directory` atomically, one part file per table; refuse to replace
        a complete run unless `overwrite`."""
        target = Path(directory)
        bad = [name for name in self.tables if not TABLE_NAME.fullmatch(str(name))]
        if bad:
            raise ValueError(f"table names {bad} are not identifiers ([a-z][a-z0-9_]*); rename "
                             "them before saving")
        check_target(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        # a staging dir of its own: never the checkpoints of a `tokenprobe run` at the same
        # target, nor another writer's
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.save-", dir=target.parent))
        try:
            for name in self.tables:
                write_table(self.tables[name], staging / name / part_name(0))
            meta = {**self.meta, "format": FORMAT, "status": "complete",
                    "tables": sorted(self.tables), "parts": {n: 1 for n in self.tables}}
            write_json(meta, staging / RUN_JSON)
            publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def table_files(directory: str | os.PathLike, meta: dict | None = None) -> dict[str, list[Path]]:
    """The resolved Parquet files of each table `run.json` lists (`meta`, read if not given),
    in part order: `<table>/part-*.parquet`, or `<table>.parquet` in runs written before parts.

    Raises:
        InvalidRunError: `tables` is not a list of identifier-safe names (`[a-z][a-z0-9_]*`),
            a table's files are missing (fewer part files than run.json's "parts" says), or
            one resolves (through a symlink) outside `directory`.
    """
    root = Path(directory)
    meta = json.loads((root / RUN_JSON).read_text()) if meta is None else meta
    names, counts = meta.get("tables"), meta.get("parts") or {}
    where = root / RUN_JSON
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidRunError(f'{where}: "tables" must be a list of table names, got '
                              f"{str(names)[:80]!r}; this run.json was not written by tokenprobe "
                              "or was edited, write the run again")
    real_root, files = root.resolve(), {}
    for name in names:
        if not TABLE_NAME.fullmatch(name):
            raise InvalidRunError(f"{where} lists table {name[:80]!r}: a table name must be an "
                                  "identifier ([a-z][a-z0-9_]*), never a path; refusing to "
                                  "open this run")
        folder = root / name
        if folder.is_dir():
            found = sorted((f for f in folder.iterdir() if PART_FILE.fullmatch(f.name)),
                           key=part_index)
            expected = counts.get(name) if isinstance(counts, dict) else None
            if not found or (isinstance(expected, int) and len(found) != expected):
                raise InvalidRunError(f"{where} lists table {name!r} with {expected or 'some'} "
                                      f"part file(s) but {folder} holds {len(found)}; write the "
                                      "run again")
        elif (root / f"{name}.parquet").exists() or (root / f"{name}.parquet").is_symlink():
            found = [root / f"{name}.parquet"]
        else:
            raise InvalidRunError(f"{where} lists table {name!r} but its files ({name}/ or "
                                  f"{name}.parquet) are missing from the run directory; write "
                                  "the run again")
        resolved = []
        for file in found:
            real = file.resolve()
            if real_root not in real.parents:
                raise InvalidRunError(f"{file} resolves to {real}, outside the run directory; "
                                      "refusing to open this run (copy the file into the run "
                                      "instead of linking it)")
            if not real.is_file():
                raise InvalidRunError(f"{where} lists table {name!r} but {file.name} is "
                                      "missing from the run directory; write the run again")
            resolved.append(real)
        files[name] = resolved
    return files


def open_run(directory: str | os.PathLike) -> Run:
    """Open a complete run directory written by `tokenprobe run --out` or `Run.save`, reading
    only its run.json: tables are read when asked for (see `Run`).

    Raises:
        RunNotFoundError: `directory` holds no complete run.
        InvalidRunError: its run.json lists a table name that is not an identifier, or a table
            whose files are missing or outside the directory (see `table_files`); a file that
            is not Parquet is found when the table is read.
    """
    path = Path(directory)
    if not is_complete(path):
        hint = (f" (an interrupted --overwrite left the run it replaces at {old_dir(path)}; run "
                "the same command again to finish it, or move that directory back)"
                if old_dir(path).exists() else
                " (an unfinished run is staged beside it; run the same command again to resume)"
                if staging_dir(path).exists() else "")
        raise RunNotFoundError(f"{path} is not a complete tokenprobe run{hint}")
    meta = json.loads((path / RUN_JSON).read_text())
    files = table_files(path, meta)
    for name, found in files.items():  # a file that is not Parquet fails here, not later
        _check_parquet(found[0], name, path)
    return Run(Tables(files=files, where=str(path)), meta)


def _check_parquet(file: Path, name: str, where: Path) -> None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(file)
    except (OSError, ValueError) as err:
        raise InvalidRunError(f"{where}: table {name} ({file.name}) is not a readable Parquet "
                              f"file: {err}") from err
