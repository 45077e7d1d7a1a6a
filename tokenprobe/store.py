"""The run store: a run is a directory of `run.json` plus one Parquet file per table.

Every command that writes a run does it through `RunWriter`. Writes are atomic at the run
level: tables go to a staging directory `.<name>.partial` beside the target and the staging
directory is renamed to the target when every table is complete. While a run is in progress
each finished part (a batch, a rollout set) is kept in the staging directory, so a run
interrupted and started again with the same settings resumes after the parts it finished.

A run's files are data, never paths: the table names `run.json` lists are checked to be
identifiers and their Parquet files to lie inside the run directory (`table_files`) before
anything reads them.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd

from tokenprobe.tables import conform, merge_parts

RUN_JSON = "run.json"
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")  # what a table name in run.json may be


class RunExistsError(FileExistsError):
    """The output directory already holds a complete run."""


class RunNotFoundError(FileNotFoundError):
    """The directory is not a complete tokenprobe run."""


class OutputNotWritableError(OSError):
    """The output path cannot be written: its parent (or the nearest ancestor that exists) is
    read-only, is a file, or accepts no new directory. The message names the path and why."""


class InvalidRunError(RunNotFoundError):
    """A complete-looking run whose run.json or table files cannot be read safely: a table name
    that is not an identifier, or a table file that is missing, unreadable or outside the run
    directory. The message says which."""


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
            for name, frame in self.tables.items():
                frame.to_parquet(staging / f"{name}.parquet", index=False)
            meta = {**self.meta, "status": "complete", "tables": sorted(self.tables)}
            (staging / RUN_JSON).write_text(json.dumps(meta, indent=2, default=str))
            publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def is_complete(directory: Path) -> bool:
    try:
        meta = json.loads((directory / RUN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("status") == "complete"


def table_files(directory: str | os.PathLike, meta: dict | None = None) -> dict[str, Path]:
    """The resolved Parquet file of each table `run.json` lists (`meta`, read if not given).

    Raises:
        InvalidRunError: `tables` is not a list of identifier-safe names (`[a-z][a-z0-9_]*`),
            or a table's file is missing or resolves (through a symlink) outside `directory`.
    """
    root = Path(directory)
    meta = json.loads((root / RUN_JSON).read_text()) if meta is None else meta
    names = meta.get("tables")
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
        file = (root / f"{name}.parquet").resolve()
        if real_root not in file.parents:
            raise InvalidRunError(f"{root / f'{name}.parquet'} resolves to {file}, outside the "
                                  "run directory; refusing to open this run (copy the file "
                                  "into the run instead of linking it)")
        if not file.is_file():
            raise InvalidRunError(f"{where} lists table {name!r} but {name}.parquet is missing "
                                  "from the run directory; write the run again")
        files[name] = file
    return files


def check_target(target: Path, *, overwrite: bool) -> None:
    """Raise if `target` holds a complete run (and not `overwrite`), is some other file or
    non-empty directory (`overwrite` or not), or cannot be written (`check_writable`)."""
    if target.exists() and is_complete(target):
        if not overwrite:
            raise RunExistsError(f"{target} already holds a complete run; choose another "
                                 "--out, or pass --overwrite to replace it")
    elif target.exists() and (target.is_file() or any(target.iterdir())):
        what = "a file" if target.is_file() else "a directory that is not a tokenprobe run"
        raise FileExistsError(f"{target} exists and is not a tokenprobe run ({what}); refusing "
                              "to write into it, with --overwrite too: choose another --out, "
                              "or move it away")
    check_writable(target)


def check_writable(target: Path) -> None:
    """Raise OutputNotWritableError unless a directory can be made where `target` and its
    staging directory go: in its parent, or the nearest ancestor that exists (the missing ones
    are made later). The check makes one empty directory there and removes it at once."""
    base = Path(os.path.abspath(target)).parent
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".check", dir=base))
    except OSError as err:
        raise OutputNotWritableError(f"cannot write {target}: making a directory in {base} "
                                     f"fails ({err.strerror}); choose another --out") from err


def publish(staging: Path, target: Path) -> None:
    """Move a complete staging dir into place; what was at `target` (a run, or for a report's
    --overwrite any file) is removed only after."""
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def open_run(directory: str | os.PathLike) -> Run:
    """Open a complete run directory written by `Run.save` or `tokenprobe run --out`.

    Raises:
        RunNotFoundError: `directory` holds no complete run.
        InvalidRunError: its run.json lists a table name that is not an identifier, or a table
            file that is missing, unreadable or outside the directory (see `table_files`).
    """
    path = Path(directory)
    if not is_complete(path):
        hint = (" (an unfinished run is staged beside it; run the same command again to resume)"
                if staging_dir(path).exists() else "")
        raise RunNotFoundError(f"{path} is not a complete tokenprobe run{hint}")
    meta = json.loads((path / RUN_JSON).read_text())
    tables = {}
    for name, file in table_files(path, meta).items():
        try:
            tables[name] = pd.read_parquet(file)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise InvalidRunError(f"{path}: table {name} ({file.name}) is not a readable "
                                  f"Parquet file: {err}") from err
    return Run(tables, meta)


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
    architecture, sizes, dtype and device."""
    config, weight = model.config, next(model.parameters())
    return {"model": name, "weights_fingerprint": fingerprint,
            "architecture": type(model).__name__, "n_layers": config.num_hidden_layers,
            "d_model": config.hidden_size, "vocab_size": config.vocab_size,
            "dtype": str(weight.dtype).removeprefix("torch."), "device": str(weight.device)}


def prompt_tables(tokenizer, rows: list[tuple[int, str, list[int], bool]]
                  ) -> dict[str, pd.DataFrame]:
    """The `prompts` and `tokens` rows of prompts given as (prompt_id, text, token ids,
    truncated): what every run holds of its text."""
    from tokenprobe.tokens import token_rows

    special = set(tokenizer.all_special_ids)
    prompts = pd.DataFrame(
        [(i, text, len(ids), truncated, bool(ids) and ids[0] in special)
         for i, text, ids, truncated in rows],
        columns=["prompt_id", "text", "n_tokens", "truncated", "first_is_special"])
    tokens = pd.concat([token_rows(tokenizer, i, ids) for i, _, ids, _ in rows],
                       ignore_index=True)
    return {"prompts": conform("prompts", prompts), "tokens": conform("tokens", tokens)}


class RunWriter:
    """The one way a run is written: by `tokenprobe.run`, the critical-token search,
    attribution and counterfactual generation.

    It owns the run's base metadata (the model, `settings`, provenance), its parts (numbered
    table sets, one per batch, prompt or rollout set, in any order), checkpointing, resume and
    publishing. With `out`, each part is kept in a staging directory `.<name>.partial` beside
    `out` as soon as it is written, a writer made again with the same model and settings
    resumes after the parts already there (`done`), and `finish` publishes the run at `out`
    atomically; nothing is written before the first part. Without `out` the parts stay in
    memory and `finish` returns the run.

    Args:
        out: the run directory, or None for a run kept in memory.
        model, name, fingerprint: the transformers model run, its name and weights fingerprint.
        settings: what the run computed from, in run.json; with the model they identify the
            run for resume (a staging dir left with other settings is refused, never mixed in).
        meta: more run.json entries that do not identify it (the backend, the device, ...).
        overwrite: allow replacing a complete run at `out`.
    """

    def __init__(self, out: str | os.PathLike | None, *, model, name: str, fingerprint: str,
                 settings: dict, meta: dict | None = None, overwrite: bool = False) -> None:
        described = model_meta(model, name, fingerprint)
        self.meta = {**described, **(meta or {}), **settings, **provenance()}
        self.target = Path(out) if out is not None else None
        self._memory: dict[int, dict[str, pd.DataFrame]] = {}
        if self.target is None:
            return
        request = {"model": name, "weights_fingerprint": fingerprint,
                   "dtype": described["dtype"], **settings}
        self.request = json.loads(json.dumps(request, default=str))
        check_target(self.target, overwrite=overwrite)
        self.staging = staging_dir(self.target)
        state = self.staging / "request.json"
        if self.staging.exists():
            previous = json.loads(state.read_text()) if state.exists() else None
            if previous != self.request:
                raise FileExistsError(
                    f"{self.staging} holds an unfinished run with different settings; run the "
                    "same command as before to resume it, or delete that directory (--overwrite "
                    "does not), or choose another --out")

    def done(self) -> set[int]:
        """The parts already written (after a resume: those of the interrupted run too)."""
        if self.target is None:
            return set(self._memory)
        if not (self.staging / "parts").exists():
            return set()
        return {int(p.name) for p in (self.staging / "parts").iterdir()
                if p.is_dir() and not p.name.startswith(".")}

    def write(self, index: int, tables: dict[str, pd.DataFrame]) -> None:
        """Store part `index`; on disk it counts as done only once all its tables are."""
        if self.target is None:
            self._memory[index] = tables
            return
        self._stage()
        tmp = self.staging / "parts" / f".{index:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, frame in tables.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
        tmp.rename(self.staging / "parts" / f"{index:06d}")

    def _stage(self) -> None:
        """Make the staging dir (with the first part: before it, nothing is written)."""
        if not self.staging.exists():
            self.target.parent.mkdir(parents=True, exist_ok=True)
            (self.staging / "parts").mkdir(parents=True)
            (self.staging / "request.json").write_text(json.dumps(self.request, indent=2))

    def read(self, index: int, name: str) -> pd.DataFrame:
        """Table `name` of part `index`, as written."""
        if self.target is None:
            return self._memory[index][name]
        return pd.read_parquet(self.staging / "parts" / f"{index:06d}" / f"{name}.parquet")

    def _merged(self) -> dict[str, pd.DataFrame]:
        if self.target is None:
            parts = [self._memory[i] for i in sorted(self._memory)]
            names = sorted({n for part in parts for n in part})
            return {n: merge_parts(n, [part.get(n) for part in parts]) for n in names}
        dirs = sorted((self.staging / "parts").glob("[0-9]*"))
        names = sorted({f.stem for part in dirs for f in part.glob("*.parquet")})
        return {n: merge_parts(n, [pd.read_parquet(p / f"{n}.parquet") for p in dirs
                                   if (p / f"{n}.parquet").exists()]) for n in names}

    def finish(self, complete: Callable[[dict], tuple[dict, dict]] | None = None) -> Run:
        """Merge the parts into one table each, let `complete(tables)` add the run-level
        columns and return (tables, more run.json entries, e.g. the summary), and publish the
        run (with `out`) or return it."""
        tables, extra = self._merged(), {}
        if complete is not None:
            tables, extra = complete(tables)
        meta = {**self.meta, **extra, "status": "complete", "tables": sorted(tables)}
        if self.target is None:
            return Run(tables, meta)
        self._stage()
        for name, frame in tables.items():
            frame.to_parquet(self.staging / f"{name}.parquet", index=False)
        (self.staging / RUN_JSON).write_text(json.dumps(meta, indent=2, default=str))
        shutil.rmtree(self.staging / "parts")
        (self.staging / "request.json").unlink()
        publish(self.staging, self.target)
        return Run(tables, meta)
