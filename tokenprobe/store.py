"""The run store: a run is a directory of `run.json` plus one Parquet file per table.

Writes are atomic at the run level: tables go to a staging directory `.<name>.partial` beside
the target and the staging directory is renamed to the target when every table is complete.
While a run is in progress each finished batch is kept in the staging directory, so a run
interrupted and started again with the same settings resumes after the last finished batch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from tokenprobe.tables import merge_parts

RUN_JSON = "run.json"


class RunExistsError(FileExistsError):
    """The output directory already holds a complete run."""


class RunNotFoundError(FileNotFoundError):
    """The directory is not a complete tokenprobe run."""


class Run:
    """A finished run: metadata plus tables, each a pandas DataFrame (`run.tokens`, ...)."""

    def __init__(self, tables: dict[str, pd.DataFrame], meta: dict) -> None:
        self.tables = tables
        self.meta = meta

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"run has no table {name!r}; tables: {sorted(tables)}")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.tables.items())
        return f"Run(model={self.meta.get('model')!r}, {sizes})"

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the run to `directory` atomically; refuse to replace a complete run unless
        `overwrite`."""
        target = Path(directory)
        check_target(target, overwrite=overwrite)
        staging = staging_dir(target)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, frame in self.tables.items():
            frame.to_parquet(staging / f"{name}.parquet", index=False)
        meta = {**self.meta, "status": "complete", "tables": sorted(self.tables)}
        (staging / RUN_JSON).write_text(json.dumps(meta, indent=2, default=str))
        publish(staging, target)
        return target


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def is_complete(directory: Path) -> bool:
    try:
        return json.loads((directory / RUN_JSON).read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def check_target(target: Path, *, overwrite: bool) -> None:
    """Raise if `target` holds a complete run (and not `overwrite`) or is some other file/dir."""
    if not target.exists():
        return
    if is_complete(target):
        if not overwrite:
            raise RunExistsError(f"{target} already holds a complete run; choose another "
                                 "--out, or pass --overwrite to replace it")
    elif target.is_file() or any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a tokenprobe run; refusing to write "
                              "into it")


def publish(staging: Path, target: Path) -> None:
    """Move a complete staging dir into place; an old run at `target` is removed only after."""
    old = target.parent / f".{target.name}.old"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def open_run(directory: str | os.PathLike) -> Run:
    """Open a complete run directory written by `Run.save` or `tokenprobe run --out`."""
    path = Path(directory)
    if not is_complete(path):
        hint = (" (an unfinished run is staged beside it; run the same command again to resume)"
                if staging_dir(path).exists() else "")
        raise RunNotFoundError(f"{path} is not a complete tokenprobe run{hint}")
    meta = json.loads((path / RUN_JSON).read_text())
    tables = {name: pd.read_parquet(path / f"{name}.parquet") for name in meta["tables"]}
    return Run(tables, meta)


class PartWriter:
    """Per-batch checkpoints of a run in progress, in the staging dir of `target`.

    `request` identifies the run's settings; a staging dir left by a run with other settings
    is refused rather than mixed in or deleted.
    """

    def __init__(self, target: Path, request: dict, *, overwrite: bool) -> None:
        check_target(target, overwrite=overwrite)
        self.target, self.staging = target, staging_dir(target)
        self.request = json.loads(json.dumps(request, default=str))
        state = self.staging / "request.json"
        if self.staging.exists():
            previous = json.loads(state.read_text()) if state.exists() else None
            if previous != self.request:
                raise FileExistsError(
                    f"{self.staging} holds an unfinished run with different settings; run the "
                    "same command as before to resume it, or delete that directory")
        else:
            (self.staging / "parts").mkdir(parents=True)
            state.write_text(json.dumps(self.request, indent=2))

    def done_batches(self) -> set[int]:
        return {int(p.name) for p in (self.staging / "parts").iterdir()
                if p.is_dir() and not p.name.startswith(".")}

    def write_batch(self, index: int, tables: dict[str, pd.DataFrame]) -> None:
        """Store one batch's tables; the batch counts as done only once all are written."""
        tmp = self.staging / "parts" / f".{index:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, frame in tables.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        tmp.rename(self.staging / "parts" / f"{index:06d}")

    def finish(self, meta: dict, complete: Callable[[dict], tuple[dict, dict]]) -> Run:
        """Merge the batches into one Parquet file per table, let `complete(tables)` add the
        run-level columns and return (tables, summary), store the summary in the metadata,
        and publish the run."""
        parts = sorted((self.staging / "parts").glob("[0-9]*"))
        names = sorted({f.stem for part in parts for f in part.glob("*.parquet")})
        tables = {n: merge_parts(n, [pd.read_parquet(p / f"{n}.parquet") for p in parts
                                     if (p / f"{n}.parquet").exists()]) for n in names}
        tables, summary = complete(tables)
        for name, frame in tables.items():
            frame.to_parquet(self.staging / f"{name}.parquet", index=False)
        meta = {**meta, "summary": summary, "status": "complete", "tables": names}
        (self.staging / RUN_JSON).write_text(json.dumps(meta, indent=2, default=str))
        shutil.rmtree(self.staging / "parts")
        (self.staging / "request.json").unlink()
        publish(self.staging, self.target)
        return Run(tables, meta)
