"""A report's static figures named by model and run, with captions, and runs side by side.

`tokenprobe report` writes the report with `report.write_report(..., static=False)` and then
`add_figures`: the same figures (`report.run_section`, `report.curve_section`) exported as
`figures/<run>_<model>_p<prompt>_<kind>.{png,svg,pdf}` with a caption sentence in `.txt`,
and with `compare` the runs side by side (`figures_compare`) on the prompts they share, which
also go into the HTML page. manifest.json lists the files (`figures`), what each report name
became (`figure_files`) and the captions.
"""
from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from tokenprobe.analyses import report
from tokenprobe.analyses.figure_names import FigureInfo, describe_figures, run_name, unique
from tokenprobe.analyses.figures_compare import MEASURES, compare_figure, compare_frames, \
    shared_prompts
from tokenprobe.analyses.report_export import Style, export_figures
from tokenprobe.store import Run


def report_figures(labelled: list[tuple[str, Run, Path]], *, curve: pd.DataFrame | None,
                   max_prompts: int) -> tuple[dict[str, go.Figure], dict[str, FigureInfo]]:
    """The report's figures by report name, and what each shows."""
    sections = [report.curve_section(curve)] if curve is not None else []
    sections += [report.run_section(i, lab, run, curve=curve, max_prompts=max_prompts)
                 for i, (lab, run, _) in enumerate(labelled)]
    figures = {k: v for s in sections for k, v in s.figures.items()}
    runs = [(lab, str(run.meta.get("model", "MODEL")),
             dict(zip(run.prompts.prompt_id.astype(int), run.prompts.text)))
            for lab, run, _ in labelled]
    return figures, describe_figures(list(figures), runs)


def comparison_figures(labelled: list[tuple[str, Run, Path]], *, max_prompts: int
                       ) -> tuple[dict[str, go.Figure], dict[str, FigureInfo]]:
    """Every measure of `figures_compare.MEASURES` the runs all have, side by side, for the
    first `max_prompts` texts they share."""
    runs = [run for _, run, _ in labelled]
    who = tuple((run_name(lab), str(run.meta.get("model", "MODEL"))) for lab, run, _ in labelled)
    figures, info = {}, {}
    for ids in shared_prompts(runs)[:max_prompts]:
        frames = [compare_frames(run, pid) for run, pid in zip(runs, ids)]
        for measure in MEASURES:
            if all(measure in f for f in frames):
                name = f"compare_p{ids[0]}_{measure}"
                panels = [(m.split("/")[-1], f[measure]) for (_, m), f in zip(who, frames)]
                figures[name] = compare_figure(panels, measure)
                text = runs[0].prompts.set_index("prompt_id").text.get(ids[0])
                info[name] = FigureInfo(who, f"compare_{measure}", ids[0], text)
    return figures, info


def add_figures(out: Path, runs: list, style: Style, *, curve: pd.DataFrame | None = None,
                max_prompts: int = 2, compare: bool = False, static: bool = True) -> list[str]:
    """Add to the report in `out` (written with static=False) its static figures (if
    `static`) and, with `compare`, the runs side by side (also on the page); returns the
    figure files' stems."""
    with tempfile.TemporaryDirectory() as scratch:
        labelled = report.load_runs(runs, Path(scratch))
        figures, info = report_figures(labelled, curve=curve, max_prompts=max_prompts)
        side, side_info = (comparison_figures(labelled, max_prompts=max_prompts)
                           if compare and len(labelled) > 1 else ({}, {}))
    info = unique({**info, **side_info})
    page = (out / "report.html").read_text(encoding="utf-8")
    if side:
        page = _with_comparison(page, side, info)
    manifest = json.loads((out / "manifest.json").read_text())
    if static:
        export_figures({**figures, **side}, out / "figures", style, info=info)
        for name, about in info.items():
            page = page.replace(f"<figcaption>figures/{name}.png|svg|pdf</figcaption>",
                                f"<figcaption>figures/{about.stem}.png|svg|pdf|txt: "
                                f"{html.escape(about.caption)}</figcaption>")
        manifest.update(figures=sorted(i.stem for i in info.values()),
                        figure_files={n: i.stem for n, i in info.items()},
                        captions={i.stem: i.caption for i in info.values()},
                        size_in=[round(style.width / 96, 2), round(style.height / 96, 2)])
    else:
        manifest["figures"] = sorted(set(manifest["figures"]) | set(side))
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return sorted(i.stem for i in info.values())


def _with_comparison(page: str, side: dict[str, go.Figure], info: dict[str, FigureInfo]) -> str:
    """`page` with a section of the side-by-side figures at its end (and in its contents)."""
    inline = "* plotly.js v" not in page
    parts = ['<section id="compare"><h2>Runs side by side</h2><p>The same measure of each '
             "run on the text they share, one panel per model, on one value axis.</p>"]
    for name, fig in side.items():
        div = fig.to_html(full_html=False, include_plotlyjs=inline, div_id=f"fig-{name}",
                          config={"displaylogo": False})
        parts.append(f"<figure>{div}<figcaption>figures/{name}.png|svg|pdf</figcaption>"
                     "</figure>")
        inline = False
    parts.append("</section>")
    end = page.rindex("</body>")  # last, so that plotly.js inlined earlier is loaded
    page = page[:end] + "".join(parts) + page[end:]
    toc = page.find('<ul><li><a href="#')
    if toc >= 0:
        close = page.index("</ul>", toc)
        page = page[:close] + '<li><a href="#compare">Runs side by side</a></li>' + page[close:]
    return page
