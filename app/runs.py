"""The dashboard's access to the run store: runs under a root, safe paths, live runs, downloads."""
from __future__ import annotations

import datetime
import io
import os
import re
from pathlib import Path

import pandas as pd

from tokenprobe.store import RUN_JSON, is_complete

ROOT_ENV = "TOKENPROBE_RUNS_ROOT"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunPathError(ValueError):
    """A run path that is not a run directory inside the runs root; the message says why."""


def runs_root(default: str = "runs") -> Path:
    """The runs root the app serves: $TOKENPROBE_RUNS_ROOT (`tokenprobe app` sets it) or
    `default`."""
    return Path(os.environ.get(ROOT_ENV, default)).resolve()


def list_runs(root: str | os.PathLike) -> list[str]:
    """Complete runs inside `root`, as paths relative to it (one level of grouping allowed,
    e.g. `demo` and `sweeps/a`), sorted; unfinished and hidden directories are skipped."""
    root = Path(root).resolve()
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or not _within(root, child):
            continue
        if is_complete(child):
            found.append(child.name)
        else:
            found += [f"{child.name}/{g.name}" for g in sorted(child.iterdir())
                      if not g.name.startswith(".") and g.is_dir() and _within(root, g)
                      and is_complete(g)]
    return found


def _within(root: Path, path: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def inside(root: str | os.PathLike, name: str) -> Path:
    """`root / name` resolved, or RunPathError if it escapes `root` (.., absolute paths,
    symlinks pointing out)."""
    root = Path(root).resolve()
    if not name or not name.strip():
        raise RunPathError("no run given: pick one from the list")
    path = (root / name).resolve()
    if not _within(root, path):
        raise RunPathError(f"{name!r} is outside the runs root {root}; only runs inside it "
                           "can be opened")
    return path


def resolve_run(root: str | os.PathLike, name: str) -> Path:
    """The directory of run `name` inside `root`; RunPathError if it escapes the root or is
    not a complete run."""
    path = inside(root, name)
    if not path.is_dir():
        raise RunPathError(f"no run {name!r} under {Path(root).resolve()}")
    if not is_complete(path):
        raise RunPathError(f"{name!r} is not a complete tokenprobe run (no {RUN_JSON} with "
                           "status complete); finish it with the command that started it")
    return path


def new_run_path(root: str | os.PathLike, name: str | None = None) -> Path:
    """Where a live run named `name` (default `live-<UTC time>`) is saved: a fresh directory
    inside `root`; RunPathError for an unsafe name or one that is taken."""
    name = name or datetime.datetime.now(datetime.timezone.utc).strftime("live-%Y%m%d-%H%M%S")
    if not NAME.fullmatch(name):
        raise RunPathError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    path = inside(root, name)
    if path.exists():
        raise RunPathError(f"{name!r} already exists under the runs root; choose another name")
    return path


def frame_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """A table as a CSV or Parquet download."""
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValueError(f"unknown format {fmt!r}; use 'csv' or 'parquet'")


def grid_table(grid: pd.DataFrame, value: str) -> pd.DataFrame:
    """A layer-indexed grid back in tidy form (layer, <column name>, value) for download."""
    return grid.stack().rename(value).reset_index()
