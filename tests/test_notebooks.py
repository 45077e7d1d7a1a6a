"""The notebooks: stored executed, with a static PNG beside every plotly figure so that they
render on GitHub, and they execute top to bottom on the embedded model (a failing cell fails)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
MAX_BYTES = 1_500_000


def executor():
    """`notebooks/execute.py`, the module `make notebooks` runs (not a package: load by path)."""
    spec = importlib.util.spec_from_file_location("notebooks_execute",
                                                  ROOT / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rich(book) -> list[list[tuple[str, ...]]]:
    """Per code cell, the mimetypes of each rich output (execute_result / display_data)."""
    return [[tuple(sorted(o.data)) for o in c.outputs
             if o.output_type in ("execute_result", "display_data")]
            for c in book.cells if c.cell_type == "code"]


def errors(book) -> list:
    return [o for c in book.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_is_executed_with_a_png_for_every_figure(path):
    import nbformat

    assert len(NOTEBOOKS) >= 4
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} is not stored executed top to bottom (run `make notebooks`)"
    assert not errors(book)
    outputs = [mimes for cell in rich(book) for mimes in cell]
    figures = [mimes for mimes in outputs if PLOTLY in mimes]
    assert figures, f"{path.name} shows no plotly figure"
    assert all("image/png" in mimes for mimes in figures), path.name
    # nbclient's timestamps and widget state are stripped, so a rerun's diff stays small
    assert not any("execution" in c.metadata for c in code)
    assert "widgets" not in book.metadata


def test_an_error_cell_fails_the_execution(tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                           nbformat.v4.new_code_cell("1 / 0")])
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        executor().execute(book, tmp_path)


@pytest.mark.embedded
@pytest.mark.browser
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_as_stored(path, tmp_path):
    """A fresh run raises on any failing cell and gives the stored notebook's kinds of output,
    cell by cell (a stale stored notebook fails here: rerun `make notebooks`)."""
    import nbformat

    from tokenprobe.analyses.report_export import find_browser

    require_tool("Chrome or Chromium for kaleido (the notebooks' static figures)",
                 find_browser(), "browser")
    stored = nbformat.read(path, as_version=4)
    book = executor().execute(nbformat.read(path, as_version=4), tmp_path)
    assert not errors(book)
    assert rich(book) == rich(stored)
