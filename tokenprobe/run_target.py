"""Where a run goes: the target checked before any work, the staging directory beside it,
the atomic publish that puts a finished run in place, and the repair of an interrupted one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

RUN_JSON = "run.json"


class RunExistsError(FileExistsError):
    """The output directory already holds a complete run."""


class RunLockedError(FileExistsError):
    """Another process is writing the same run (it holds the run's lock file)."""


class RunNotFoundError(FileNotFoundError):
    """The directory is not a complete tokenprobe run."""


class OutputNotWritableError(OSError):
    """The output path cannot be written: its parent (or the nearest ancestor that exists) is
    read-only, is a file, or accepts no new directory. The message names the path and why."""


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def is_complete(directory: Path) -> bool:
    try:
        meta = json.loads((Path(directory) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("status") == "complete"


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


def old_dir(target: Path) -> Path:
    """Where `publish` moves what was at `target` until the new run is in place."""
    return target.parent / f".{target.name}.old"


def publish(staging: Path, target: Path) -> None:
    """Move a complete staging dir into place; what was at `target` (a run, or for a report's
    --overwrite any file) is moved aside to `.NAME.old` first and removed only after.
    `recover` repairs a publish interrupted between the two renames."""
    old = old_dir(target)
    if old.exists() or old.is_symlink():
        remove(old)
    if target.exists() or target.is_symlink():
        target.rename(old)
    staging.rename(target)
    if old.exists() or old.is_symlink():
        remove(old)


def recover(target: Path) -> None:
    """Repair an interrupted `publish` of a run: with nothing at `target` and the old run at
    `.NAME.old`, the new run (a complete staging dir) is moved in if there is one, else the
    old run is put back; an `.NAME.old` left beside a target is removed."""
    old = old_dir(target)
    if not (old.exists() or old.is_symlink()):
        return
    staged = staging_dir(target)
    new = next((d for d in (staged, staged / "_final") if is_complete(d)), None)
    if target.exists() or target.is_symlink():
        remove(old)
    elif new is not None:
        new.rename(target)
        remove(old)
    else:
        old.rename(target)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
