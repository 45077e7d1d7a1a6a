"""Execute the notebooks in place and store them with their outputs (`make notebooks`).

Each notebook runs top to bottom in a fresh `python3` kernel, from a scratch directory, and is
written back with its outputs; an error in any cell stops it and nothing is written. What
changes from one run to the next without the outputs changing is dropped so that a rerun's
diff shows only real changes: nbclient's per-cell timestamps (`record_timing=False`), the saved
widget state, and the kernel's Python version in `language_info`.

Usage: `python notebooks/execute.py [NOTEBOOK ...]` (all of `notebooks/*.ipynb` by default).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
TIMEOUT_S = 1800  # per cell: generous, for a CPU shared with other work


def execute(book: nbformat.NotebookNode, workdir: Path) -> nbformat.NotebookNode:
    """Run every cell of `book` in a fresh kernel with `workdir` as its working directory.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised (the notebook stops there).
    """
    NotebookClient(book, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                   store_widget_state=False, allow_errors=False,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return book


def strip_volatile(book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop the metadata that differs between identical runs (in place; returns `book`)."""
    book.metadata.pop("widgets", None)
    book.metadata["language_info"] = {"name": "python"}
    for cell in book.cells:
        cell.metadata.pop("execution", None)
    return book


def main(paths: list[str]) -> int:
    """Execute and rewrite each notebook in `paths` (all of them when empty), one at a time."""
    for path in [Path(p) for p in paths] or NOTEBOOKS:
        start = time.perf_counter()
        book = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as workdir:
            execute(book, Path(workdir))
        nbformat.write(strip_volatile(book), path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
