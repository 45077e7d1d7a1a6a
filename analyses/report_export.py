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

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tokenprobe.analyses.figure_names import FigureInfo

FORMATS = ("png", "svg", "pdf")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@dataclass(frozen=True)
class Style:
    """Figure size and fonts of one report style.

    Attributes:
        name: "screen" or "paper".
        width, height: figure size in CSS pixels (96 per inch in the PDF and SVG).
        font_family, font_size: fonts of titles (size in CSS px; 12 px = 9 pt).
        scale: PNG pixels per CSS pixel (3.125 gives 300 dpi).
        titles: keep figure titles (a paper puts them in the caption instead).
        tick_size: font of tick labels, legends and colour bars (CSS px; 10 px = 7.5 pt).
    """

    name: str
    width: int
    height: int
    font_family: str
    font_size: int
    scale: float
    titles: bool
    tick_size: int = 12


PAPER_WIDTHS = {"single": 3.3, "double": 7.0}  # inches: one column, both columns


def paper_style(width: str | float = "single") -> Style:
    """The paper style at `width`: "single" (3.3 in), "double" (7 in) or inches (1 to 12);
    2.5 in high or 0.45 of the width if more; 9 pt serif titles, 7.5 pt ticks, 300 dpi PNG.

    Raises:
        ValueError: an unknown name or a width outside 1 to 12 inches.
    """
    try:
        inches = PAPER_WIDTHS[width] if width in PAPER_WIDTHS else float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be single, double or inches, got {width!r}") from None
    if not 1 <= inches <= 12:
        raise ValueError(f"width must be 1 to 12 inches, got {inches}")
    return Style("paper", round(96 * inches), round(96 * max(2.5, 0.45 * inches)),
                 "Times New Roman, Times, serif", 12, 300 / 96, False, tick_size=10)


STYLES = {
    "screen": Style("screen", 900, 460, "Open Sans, verdana, arial, sans-serif", 13, 2.0, True,
                    tick_size=12),
    # One column of a two-column paper: 3.3 in wide (317 px at 96/in), 2.5 in high, 9 pt serif,
    # PNG at 300 dpi.
    "paper": paper_style("single"),
}


def find_browser() -> str | None:
    """The Chrome / Chromium kaleido will use: `$BROWSER_PATH`, else the first on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    return next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)


def styled(fig: go.Figure, style: Style) -> go.Figure:
    """A copy of `fig` laid out for `style`: size, fonts, titles dropped for paper, the
    marker-size legend of a massive-activation figure (`figures.add_size_legend`), and
    `figure_layout.fit_figure` (ticks thinned to fit, margins from the labels)."""
    from tokenprobe.analyses.figure_layout import fit_figure
    from tokenprobe.analyses.figures import add_size_legend

    out = add_size_legend(go.Figure(fig))
    out.update_layout(width=style.width, height=style.height, template="plotly_white",
                      font={"family": style.font_family, "size": style.font_size})
    if not style.titles:
        out.update_layout(title=None)
    out.update_xaxes(tickfont={"size": style.tick_size})
    out.update_yaxes(tickfont={"size": style.tick_size})
    return fit_figure(out, width=style.width, height=style.height, font_px=style.tick_size,
                      title=style.titles)


def export_figures(figures: dict[str, go.Figure], directory: Path, style: Style, *,
                   info: dict[str, FigureInfo] | None = None) -> list[Path]:
    """Write each figure as `<name>.png`, `.svg` and `.pdf` in `directory` with one browser;
    a figure with an entry in `info` is written as `<info.stem>.*` with its caption sentence
    in `<info.stem>.txt`.

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
        about = (info or {}).get(name)
        stem = about.stem if about else name
        if about is not None:
            caption = directory / f"{stem}.txt"
            caption.write_text(about.caption + "\n", encoding="utf-8")
            paths.append(caption)
        for fmt in FORMATS:
            path = directory / f"{stem}.{fmt}"
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


MISSING = "--"  # the one marker of a missing value (None, NA, NaN, empty) in a LaTeX table


def _missing(value: object) -> bool:
    if value is None or value is pd.NA or (isinstance(value, str) and value.strip() in
                                           ("", "nan", "NaN", "None", "<NA>")):
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def to_latex(frame: pd.DataFrame, *, caption: str, label: str) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule) of `frame` via pandas' to_latex,
    every header and text cell escaped with `latex_escape`, floats to 4 significant digits, and
    every missing value (None, NA, NaN, an empty or "nan" text) written as `MISSING` (--)."""
    cells = frame.copy()
    for col in cells.columns:
        if cells[col].dtype == object or pd.api.types.is_string_dtype(cells[col]):
            cells[col] = cells[col].map(lambda v: MISSING if _missing(v) else latex_escape(v))
    cells.columns = [latex_escape(c) for c in cells.columns]
    return cells.to_latex(index=False, escape=False, na_rep=MISSING, float_format="%.4g",
                          caption=latex_escape(caption), label=label, position="htbp")


def write_table(frame: pd.DataFrame, directory: Path, name: str, caption: str) -> list[Path]:
    """`<name>.csv` (exact values) and `<name>.tex` (booktabs) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    csv, tex = directory / f"{name}.csv", directory / f"{name}.tex"
    frame.to_csv(csv, index=False)
    tex.write_text(to_latex(frame, caption=caption, label=f"tab:{name.replace('_', '-')}"),
                   encoding="utf-8")
    return [csv, tex]
