"""Runs side by side: the same measure of two or more models on the same text, one panel each.

`shared_prompts` finds the prompts every run has (same text), `compare_frames` reads one run's
per-layer and per-position series of a prompt, and `compare_figure` puts one measure of the
runs in panels that share the value axis, so the models read on one scale;
`comparison_figures` makes every such figure a set of runs shares, with what each shows.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from tokenprobe.analyses import views
from tokenprobe.analyses.figure_layout import human_title
from tokenprobe.analyses.figure_names import FigureInfo, run_name
from tokenprobe.store import Run

# measure -> (what the panels show, the value column, x axis, log value axis)
MEASURES = {
    "sink_mass": ("sink mass per layer (mean and max over heads)", "sink_mass", "layer", False),
    "massive": ("largest |h| per layer (max over positions and dims)", "max_abs", "layer", True),
    "attn_received": ("attention received per position (mean over layers)", "attn_received",
                      "pos", True),
}


def shared_prompts(runs: list[Run]) -> list[list[int]]:
    """Per text every run has, in the first run's order: the prompt id in each run."""
    ids = [dict(zip(r.prompts.text, r.prompts.prompt_id)) for r in runs]
    return [[int(m[text]) for m in ids] for text in runs[0].prompts.text
            if all(text in m for m in ids)]


def compare_frames(run: Run, prompt_id: int) -> dict[str, pd.DataFrame]:
    """The run's series of `prompt_id` for each measure of `MEASURES` it has: x (layer or
    position), label (tick text), value, and for sink_mass also max (over heads)."""
    out = {}
    if "heads" in run.tables:
        grid = views.head_grid(run, prompt_id, "sink_mass")  # (layer, head)
        out["sink_mass"] = pd.DataFrame({"x": grid.index, "label": grid.index.astype(str),
                                         "value": grid.mean(axis=1).to_numpy(),
                                         "max": grid.max(axis=1).to_numpy()})
    layers = run.tables.get("token_layers")
    if layers is not None and "max_abs" in layers:
        grid = views.layer_grid(run, prompt_id, "max_abs")  # (layer, pos)
        out["massive"] = pd.DataFrame({"x": grid.index, "label": grid.index.astype(str),
                                       "value": grid.max(axis=1).to_numpy()})
    if layers is not None and "attn_received" in layers:
        grid = views.layer_grid(run, prompt_id, "attn_received")  # (layer, pos)
        shown = views.prompt_tokens(run, prompt_id).set_index("pos").shown
        out["attn_received"] = pd.DataFrame({
            "x": grid.columns, "label": [f"{p}:{shown.get(p, '')}" for p in grid.columns],
            "value": grid.mean(axis=0).to_numpy()})
    return out


def compare_figure(panels: list[tuple[str, pd.DataFrame]], measure: str) -> go.Figure:
    """One panel per (name, frame) of `compare_frames(...)[measure]`, side by side with a
    shared value axis; every x tick is given (`figure_layout.fit_figure` thins them)."""
    what, column, x_name, log = MEASURES[measure]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[name for name, _ in panels])
    for col, (name, frame) in enumerate(panels, start=1):
        first = col == 1
        if measure == "attn_received":
            fig.add_trace(go.Bar(x=frame.x, y=frame.value, name="mean over layers",
                                 marker_color=qualitative.Plotly[0], legendgroup="mean",
                                 showlegend=False, customdata=frame.label,
                                 hovertemplate=f"{name}<br>%{{customdata}}<br>%{{y:.4g}}"
                                               "<extra></extra>"), row=1, col=col)
        else:
            fig.add_trace(go.Scatter(x=frame.x, y=frame.value, mode="lines+markers",
                                     name="mean over heads" if "max" in frame else name,
                                     legendgroup="mean", showlegend=first and "max" in frame,
                                     marker={"size": 4, "color": qualitative.Plotly[0]},
                                     hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.4g}}"
                                                   "<extra></extra>"), row=1, col=col)
        if "max" in frame:
            fig.add_trace(go.Scatter(x=frame.x, y=frame["max"], mode="lines",
                                     name="max over heads", legendgroup="max", showlegend=first,
                                     line={"dash": "dash", "color": qualitative.Plotly[1]},
                                     hovertemplate=f"{name}<br>layer %{{x}}: max %{{y:.4g}}"
                                                   "<extra></extra>"), row=1, col=col)
        fig.update_xaxes(tickvals=list(frame.x), ticktext=list(frame.label),
                         title_text=human_title(x_name), row=1, col=col)
    fig.update_yaxes(title_text=human_title(column), row=1, col=1)
    if log:
        fig.update_yaxes(type="log", dtick=1)  # powers of ten only: no small minor labels
    elif measure == "sink_mass":
        fig.update_yaxes(range=[0, 1])
    fig.update_layout(title=what.capitalize(), height=360, showlegend=measure == "sink_mass")
    return fig


def comparison_figures(labelled: list[tuple[str, Run, object]], *, max_prompts: int
                       ) -> tuple[dict[str, go.Figure], dict[str, FigureInfo]]:
    """Every measure of `figures_compare.MEASURES` the runs all have, side by side, for the
    first `max_prompts` texts they share."""
    runs = [run for _, run, _ in labelled]
    who = tuple((run_name(lab), views.model_of(run)) for lab, run, _ in labelled)
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
