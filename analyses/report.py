"""Scripted reports: one self-contained HTML page, static figures and LaTeX tables from runs.

`write_report(runs, out)` writes `out/report.html` (plotly.js inlined once, so it opens with no
network), `out/figures/<name>.{png,svg,pdf,txt}` and `out/tables/<name>.{csv,tex}`; the
sections come from `report_sections`. Frames come
from `tokenprobe.analyses.views` and the other analyses, figures from
`tokenprobe.analyses.figures`: the dashboard's own data and figure functions. The cross-run
summary is SQL over the run directories (`tokenprobe.query`). The report is staged beside `out`
and renamed into place.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from tokenprobe.analyses import views
from tokenprobe.analyses.figure_names import FigureInfo, describe_figures, unique
from tokenprobe.analyses.figures_compare import comparison_figures
from tokenprobe.analyses.report_export import (STYLES, Style, export_figures, find_browser,
                                               write_table)
from tokenprobe.analyses.report_sections import Section, curve_section, run_section
from tokenprobe.store import Run, open_run, publish


def load_runs(runs: Sequence[Run | str | os.PathLike],
              scratch: Path) -> list[tuple[str, Run, Path]]:
    """(label, run, directory) per run: a directory is opened (label: the path as given); a Run
    is saved under `scratch` so that DuckDB can read it (label: run<i>)."""
    out = []
    for i, item in enumerate(runs):
        if isinstance(item, Run):
            directory = item.save(scratch / f"run{i}")
            out.append((f"run{i}", item, directory))
        else:
            out.append((str(item), open_run(item), Path(item)))
    return out


def cross_run_summary(labelled: list[tuple[str, Run, Path]]) -> pd.DataFrame:
    """One row per run, by SQL over the run directories: model, n_prompts, T_min / T_max, and
    where the run has them sink_rate (% of prompt x layer x head with sink_mass > the run's
    eps), eps, first_massive_layer, massive_dims, max_massive, mean_entropy. Prompts with a
    NaN or inf sink mass (entropy) are left out of sink_rate (mean_entropy) and counted in
    sink_prompts_excluded (entropy_prompts_excluded)."""
    from tokenprobe.query import connect

    info = pd.DataFrame({"run": [str(d) for _, _, d in labelled],
                         "label": [lab for lab, _, _ in labelled],
                         "model": [str(r.meta.get("model")) for _, r, _ in labelled],
                         "eps": [next((p["eps"] for p in r.meta.get("probes", [])
                                       if p.get("name") == "sinks"), None)
                                 for _, r, _ in labelled]})
    with connect([d for _, _, d in labelled]) as con:
        con.register("run_info", info)
        views_ = set(con.tables)
        out = con.query("""
            SELECT i.label AS run, i.model, count(*) AS n_prompts, min(p.n_tokens) AS T_min,
                   max(p.n_tokens) AS T_max
            FROM prompts p JOIN run_info i USING (run) GROUP BY i.label, i.model""")
        if "heads" in views_:
            out = out.merge(con.query("""
                WITH bad AS (SELECT DISTINCT run, prompt_id FROM heads
                             WHERE NOT coalesce(isfinite(sink_mass), false))
                SELECT i.label AS run, 100 * avg(CAST(h.sink_mass > i.eps AS DOUBLE))
                           FILTER (WHERE b.prompt_id IS NULL) AS sink_rate,
                       any_value(i.eps) AS eps,
                       count(DISTINCT b.prompt_id) AS sink_prompts_excluded
                FROM heads h JOIN run_info i USING (run)
                     LEFT JOIN bad b ON b.run = h.run AND b.prompt_id = h.prompt_id
                GROUP BY i.label"""), on="run", how="left")
        if "massive" in views_:
            out = out.merge(con.query("""
                SELECT i.label AS run, min(m.layer) AS first_massive_layer,
                       array_to_string(list_sort(list(DISTINCT m.dim)), ',') AS massive_dims,
                       max(abs(m.value)) AS max_massive
                FROM massive m JOIN run_info i USING (run) GROUP BY i.label"""),
                on="run", how="left")
        columns = set(con.query("DESCRIBE tokens").column_name)
        if "entropy" in columns:
            out = out.merge(con.query("""
                WITH bad AS (SELECT DISTINCT run, prompt_id FROM tokens
                             WHERE pos > 0 AND NOT coalesce(isfinite(entropy), false))
                SELECT i.label AS run, avg(t.entropy) FILTER (WHERE b.prompt_id IS NULL)
                           AS mean_entropy,
                       count(DISTINCT b.prompt_id) AS entropy_prompts_excluded
                FROM tokens t JOIN run_info i USING (run)
                     LEFT JOIN bad b ON b.run = t.run AND b.prompt_id = t.prompt_id
                WHERE t.pos > 0 GROUP BY i.label"""), on="run", how="left")
    order = {lab: k for k, (lab, _, _) in enumerate(labelled)}
    return out.sort_values("run", key=lambda s: s.map(order), ignore_index=True)


def render_html(sections: list[Section], *, title: str, notes: list[str],
                info: dict[str, FigureInfo] | None = None) -> str:
    """The report page: contents, then each section; plotly.js inlined in the first figure.
    A figure in `info` is captioned with its file stem and caption sentence."""
    parts, first = [], True
    for sec in sections:
        parts.append(f'<section id="{sec.anchor}"><h2>{html.escape(sec.title)}</h2>')
        for kind, value in sec.blocks:
            if kind == "html":
                parts.append(value)
            elif kind == "figure":
                fig_html = sec.figures[value].to_html(
                    full_html=False, include_plotlyjs=first, div_id=f"fig-{value}",
                    config={"displaylogo": False})
                first = False
                about = (info or {}).get(value)
                caption = (f"figures/{about.stem}.png|svg|pdf|txt: {html.escape(about.caption)}"
                           if about else f"figures/{value}.png|svg|pdf")
                parts.append(f"<figure>{fig_html}<figcaption>{caption}</figcaption></figure>")
            else:
                frame, caption = sec.tables[value]
                parts.append(f"<p class=\"cap\">{html.escape(caption)} (tables/{value}.csv|tex)"
                             "</p>" + frame.to_html(index=False, na_rep="", float_format=_fmt,
                                                    classes="tp", border=0))
        parts.append("</section>")
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    note = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in notes)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{note}"
            f"<ul>{toc}</ul>{''.join(parts)}</body></html>\n")


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
       "table.tp{border-collapse:collapse;font-size:13px;margin-bottom:1em}"
       "table.tp td,table.tp th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
       ".cap{font-weight:600;margin-bottom:2px}.note{color:#8a5a00}"
       ".warning{background:#fff4e5;border-left:4px solid #e8a33d;padding:4px 8px}"
       ".diagnostics{background:#eef4fb;border-left:4px solid #4a90d9;padding:2px 8px}"
       "figcaption{font-size:12px;color:#666}")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def write_report(runs: Sequence[Run | str | os.PathLike], out: str | os.PathLike, *,
                 style: str | Style = "screen", overwrite: bool = False,
                 curve: pd.DataFrame | None = None, static: bool | None = None,
                 max_prompts: int = 2, compare: bool = False) -> Path:
    """Write the report of `runs` (run directories or Run objects) into `out`.

    Args:
        runs: the runs (at least one, unless `curve` is given).
        out: the report directory; staged beside it and renamed into place when complete.
        style: "screen" (900 x 460 px figures), "paper" (3.3 in wide, 9 pt serif, 300 dpi PNG)
            or a `report_export.Style` (e.g. `paper_style("double")`, 7 in wide).
        overwrite: replace an existing non-empty `out`.
        curve: a `sink_curve.sink_rate_curve` frame to include (table, figure, T = 64 cards).
        static: write PNG / SVG / PDF figures: True requires a browser, False skips them, None
            writes them if `find_browser()` finds one and says in the report if not.
        max_prompts: prompts per run with figures and token views.
        compare: add the runs side by side (sink mass per layer, largest |h| per layer,
            attention received per position) on the first `max_prompts` texts they share.

    Static figures are `figures/<run>_<model>_p<prompt>_<kind>.{png,svg,pdf}`, each with a
    caption sentence in `.txt`; manifest.json maps report names to files and captions.

    Returns:
        `out` as a Path.

    Raises:
        FileExistsError: `out` exists, is not empty and `overwrite` is False.
        RunNotFoundError: a directory is not a complete run.
        ValueError: an unknown style, or nothing to report.
    """
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
        style = STYLES[style]
    if not runs and curve is None:
        raise ValueError("nothing to report: give at least one run (or a sink-rate curve)")
    target = Path(out)
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another --out or pass "
                              "--overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write(runs, staging, style=style, curve=curve, static=static, max_prompts=max_prompts,
               compare=compare)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write(runs, staging: Path, *, style: Style, curve, static: bool | None,
           max_prompts: int, compare: bool) -> None:
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        labelled = load_runs(runs, Path(scratch))
        sections = []
        if labelled:
            summary = Section("Summary across runs", "summary")
            summary.table("summary", cross_run_summary(labelled),
                          "Per run: sink rate, first massive layer, mean entropy")
            sections.append(summary)
        if curve is not None:
            sections.append(curve_section(curve))
        sections += [run_section(i, lab, run, curve=curve, max_prompts=max_prompts)
                     for i, (lab, run, _) in enumerate(labelled)]
        side, side_info = (comparison_figures(labelled, max_prompts=max_prompts)
                           if compare and len(labelled) > 1 else ({}, {}))
    if side:
        sec = Section("Runs side by side", "compare")
        sec.text("<p>The same measure of each run on the text they share, one panel per model, "
                 "on one value axis.</p>")
        for name, fig in side.items():
            sec.figure(name, fig)
        sections.append(sec)
    figures = {k: v for s in sections for k, v in s.figures.items()}
    described = [(lab, views.model_of(run), dict(zip(run.prompts.prompt_id.astype(int),
                                                     run.prompts.text)))
                 for lab, run, _ in labelled]
    info = unique({**describe_figures(list(figures), described), **side_info})
    browser = find_browser()
    if static or (static is None and browser is not None):
        export_figures(figures, staging / "figures", style, info=info)
    else:
        info = {}  # no files to name
        if static is None:
            notes.append("Static figures (PNG/SVG/PDF) were skipped: no Chrome or Chromium "
                         "found (install Debian's chromium or set BROWSER_PATH).")
    for sec in sections:
        for name, (frame, caption) in sec.tables.items():
            write_table(frame, staging / "tables", name, caption)
    title = "tokenprobe report: " + ", ".join(dict.fromkeys(
        views.model_of(r) for _, r, _ in labelled)) if labelled else "tokenprobe report"
    (staging / "report.html").write_text(render_html(sections, title=title, notes=notes,
                                                     info=info), encoding="utf-8")
    manifest = {"style": style.name, "runs": [lab for lab, _, _ in labelled], "notes": notes,
                "figures": sorted(i.stem for i in info.values()) if info else sorted(figures),
                "figure_files": {n: i.stem for n, i in info.items()},
                "captions": {i.stem: i.caption for i in info.values()},
                "size_in": [round(style.width / 96, 2), round(style.height / 96, 2)],
                "tables": sorted(t for s in sections for t in s.tables)}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
