"""Static files of a report: figures as PNG / SVG / PDF through kaleido, tables as CSV and LaTeX.

Kaleido (>= 1) renders plotly figures in a headless Chrome or Chromium that it finds through
choreographer: `$BROWSER_PATH` if set, else `chromium`, `google-chrome`, ... on `PATH` or in
the usual install paths. It never downloads one here: without a browser the static figures are
skipped and the report says so. MathJax is switched off and plotly.js comes from the installed
plotly package, so the export needs no network.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

FORMATS = ("png", "svg", "pdf")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@dataclass(frozen=True)
class Style:
    """Figure size and fonts of one report style.

    Attributes:
        name: "screen" or "paper".
        width, height: figure size in CSS pixels (96 per inch in the PDF and SVG).
        font_family, font_size: fonts (size in CSS px; 12 px = 9 pt).
        scale: PNG pixels per CSS pixel (3.125 gives 300 dpi).
        titles: keep figure titles (a paper puts them in the caption instead).
    """

    name: str
    width: int
    height: int
    font_family: str
    font_size: int
    scale: float
    titles: bool


STYLES = {
    "screen": Style("screen", 900, 460, "Open Sans, verdana, arial, sans-serif", 13, 2.0, True),
    # One column of a two-column paper: 3.3 in wide (317 px at 96/in), 2.5 in high, 9 pt serif,
    # PNG at 300 dpi.
    "paper": Style("paper", 317, 240, "Times New Roman, Times, serif", 12, 300 / 96, False),
}


def find_browser() -> str | None:
    """The Chrome / Chromium kaleido will use: `$BROWSER_PATH`, else the first on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    return next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)


def styled(fig: go.Figure, style: Style) -> go.Figure:
    """A copy of `fig` laid out for `style` (size, fonts, margins; titles dropped for paper)."""
    out = go.Figure(fig)
    out.update_layout(width=style.width, height=style.height, template="plotly_white",
                      font={"family": style.font_family, "size": style.font_size})
    if not style.titles:
        out.update_layout(title=None, margin={"l": 40, "r": 10, "t": 10, "b": 35},
                          legend={"font": {"size": style.font_size - 2}})
    return out


def export_figures(figures: dict[str, go.Figure], directory: Path, style: Style) -> list[Path]:
    """Write each figure as `<name>.png`, `.svg` and `.pdf` in `directory` with one browser.

    Raises:
        RuntimeError: no Chrome / Chromium was found (see `find_browser`).
    """
    import kaleido

    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chrome or Chromium for kaleido: install Debian's `chromium` or "
                           "set BROWSER_PATH")
    directory.mkdir(parents=True, exist_ok=True)
    items, paths = [], []
    for name, fig in figures.items():
        fig = styled(fig, style)
        for fmt in FORMATS:
            path = directory / f"{name}.{fmt}"
            items.append({"fig": fig, "path": str(path),
                          "opts": {"format": fmt, "width": style.width, "height": style.height,
                                   "scale": style.scale if fmt == "png" else 1}})
            paths.append(path)
    previous = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        kaleido.write_fig_from_object_sync(items, kopts={"n": 1, "mathjax": False})
    finally:
        if previous is None:
            os.environ.pop("BROWSER_PATH", None)
        else:
            os.environ["BROWSER_PATH"] = previous
    return paths


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                  "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    """`text` safe in a LaTeX table cell under pdflatex: specials escaped, newlines and tabs
    shown as \\n and \\t, other non-ASCII characters as U+XXXX."""
    out = []
    for ch in str(text):
        if ch in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[ch])
        elif ch == "\n":
            out.append(r"\textbackslash{}n")
        elif ch == "\t":
            out.append(r"\textbackslash{}t")
        elif ord(ch) < 32 or ord(ch) > 126:
            out.append(f"U+{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def to_latex(frame: pd.DataFrame, *, caption: str, label: str) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule) of `frame` via pandas' to_latex,
    every header and text cell escaped with `latex_escape`, floats to 4 significant digits."""
    cells = frame.copy()
    for col in cells.columns:
        if cells[col].dtype == object or pd.api.types.is_string_dtype(cells[col]):
            cells[col] = cells[col].map(
                lambda v: "" if v is None or v is pd.NA else latex_escape(v))
    cells.columns = [latex_escape(c) for c in cells.columns]
    return cells.to_latex(index=False, escape=False, na_rep="--", float_format="%.4g",
                          caption=latex_escape(caption), label=label, position="htbp")


def write_table(frame: pd.DataFrame, directory: Path, name: str, caption: str) -> list[Path]:
    """`<name>.csv` (exact values) and `<name>.tex` (booktabs) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    csv, tex = directory / f"{name}.csv", directory / f"{name}.tex"
    frame.to_csv(csv, index=False)
    tex.write_text(to_latex(frame, caption=caption, label=f"tab:{name.replace('_', '-')}"),
                   encoding="utf-8")
    return [csv, tex]
