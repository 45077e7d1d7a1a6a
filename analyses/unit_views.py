"""Frames and figures of a unit-attribution run (`tokenprobe attribute --method shapley ...`),
shared by the dashboard and the report: a prompt's units coloured by a method, the bar chart
of unit attributions with 95% error bars, the compression curve and the per-prompt targets.
Reads a run, computes no measure (those are in `tokenprobe.analyses.unit_attribution`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from tokenprobe.analyses.views import MissingProbe, model_of, readable_token, text_boxes
from tokenprobe.store import Run

LABELS = {"saliency": "saliency: gradient norm over the unit's embeddings",
          "input_x_gradient": "input x gradient (nats, summed over the unit)",
          "integrated_gradients": "integrated gradients (nats, summed over the unit)",
          "shapley": "Shapley value (nats)",
          "removal": "removal: f - f without the unit (nats)",
          "knockout": "knockout: f - f with the unit's keys masked (nats)"}
Z95 = 1.96
ORDER_STYLE = {"top": ("#1f77b4", "top-k units kept"), "bottom": ("#d62728", "bottom-k kept"),
               "random": ("#7f7f7f", "random k kept (mean, 95% band)")}


def require_units(run: Run) -> pd.DataFrame:
    """`run.unit_attributions`, or MissingProbe naming `tokenprobe attribute`."""
    if "unit_attributions" not in run.tables:
        raise MissingProbe("unit attributions", "attribution", str(run.meta.get("model",
                                                                                "MODEL")))
    return run.unit_attributions


def methods(run: Run) -> list[str]:
    """The methods the run holds, in `UNIT_METHODS` order (gradients, Shapley, ablations)."""
    from tokenprobe.analyses.unit_attribution import UNIT_METHODS

    have = set(require_units(run).method)
    return [m for m in UNIT_METHODS if m in have]


def summary(run: Run, prompt_id: int) -> dict:
    """The prompt's entry of `meta["summary"]["unit_attribution"]` (target, f, settings)."""
    items = run.meta.get("summary", {}).get("unit_attribution", [])
    return next((i for i in items if i.get("prompt_id") == prompt_id), {})


def unit_rows(run: Run, prompt_id: int, method: str) -> pd.DataFrame:
    """The prompt's units under `method`: unit_id, text, char_start, char_end, positions,
    value, se, shown (readable text)."""
    table = require_units(run)
    rows = table[(table.prompt_id == prompt_id) & (table.method == method)]
    rows = rows.sort_values("unit_id").reset_index(drop=True)
    return rows.assign(shown=[readable_token(t) for t in rows.text])


def unit_token_frame(run: Run, prompt_id: int, method: str) -> pd.DataFrame:
    """The prompt's units as boxes for `figures.token_html` (pos = unit_id, one box per unit,
    tooltip with value, standard error and token positions)."""
    rows = text_boxes(unit_rows(run, prompt_id, method), "unit_id")
    return rows.assign(tip=[
        f"unit {r.unit_id} {r.shown!r} (tokens {r.positions}) | {method}: {r.value:+.4g}"
        + (f" ± {r.se:.3g} (SE)" if r.se > 0 else "") for r in rows.itertuples()])


def unit_bars(run: Run, prompt_id: int, method: str, title: str | None = None) -> go.Figure:
    """One bar per unit in text order, with error bars of ±1.96 SE where sampled."""
    rows = unit_rows(run, prompt_id, method)
    labels = [f"{i}: {s if len(s) <= 18 else s[:17] + '…'}" for i, s in zip(rows.unit_id,
                                                                            rows.shown)]
    sampled = bool((rows.se > 0).any())
    fig = go.Figure(go.Bar(
        x=labels, y=rows.value, marker_color=np.where(rows.value >= 0, "#2166ac", "#b2182b"),
        error_y={"type": "data", "array": Z95 * rows.se, "visible": True} if sampled else None,
        customdata=np.stack([rows.se, rows.positions], 1),
        hovertemplate="%{x}<br>%{y:.4f}<br>SE %{customdata[0]:.3g}, tokens %{customdata[1]}"
                      "<extra></extra>"))
    item = summary(run, prompt_id)
    fig.update_layout(
        title=title or f"{LABELS.get(method, method)}, {model_of(run)}: {item.get('target', '')}"
        + (" (error bars: 95%, ±1.96 SE)" if sampled else ""),
        xaxis_title=f"{item.get('units', 'unit')} unit", yaxis_title=LABELS.get(method, method),
        height=420, showlegend=False)
    return fig


def curves(run: Run, prompt_id: int) -> pd.DataFrame:
    """The prompt's compression curve rows, or MissingProbe (`--compression`)."""
    if "attribution_curves" not in run.tables:
        raise MissingProbe("compression curve", "attribution --compression",
                           str(run.meta.get("model", "MODEL")))
    table = run.attribution_curves
    return table[table.prompt_id == prompt_id].reset_index(drop=True)


def curve_figure(run: Run, prompt_id: int, title: str | None = None) -> go.Figure:
    """Target value against the share of units kept, for the top-k, bottom-k and random-k
    units (random: mean with a ±1.96 SE band), with the full prompt's value dotted."""
    rows, fig = curves(run, prompt_id), go.Figure()
    for order, (colour, name) in ORDER_STYLE.items():
        line = rows[rows.order == order].sort_values("keep_fraction")
        x = 100 * line.keep_fraction
        if order == "random" and (line.se > 0).any():
            fig.add_trace(go.Scatter(
                x=np.concatenate([x, x[::-1]]), y=np.concatenate([
                    line.value + Z95 * line.se, (line.value - Z95 * line.se)[::-1]]),
                fill="toself", fillcolor="rgba(127,127,127,0.2)", line={"width": 0},
                hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=line.value, mode="lines+markers", name=name,
                                 line={"color": colour}, customdata=line.n_kept,
                                 hovertemplate="%{x:.0f}% kept (%{customdata} units): "
                                               "%{y:.3f} nats<extra></extra>"))
    item = summary(run, prompt_id)
    if "target_value" in item:
        fig.add_hline(y=item["target_value"], line_dash="dot", line_color="#333",
                      annotation_text="full prompt")
    ranking = rows.ranking.iat[0] if len(rows) else "?"
    fig.update_layout(title=title or f"Compression by {ranking}, {model_of(run)}: "
                      f"{item.get('target', '')}", xaxis_title="units kept (%)",
                      yaxis_title="target value (nats)", height=420)
    return fig


def targets_frame(run: Run) -> pd.DataFrame:
    """Per prompt: target, its value, units, IG's completeness gap and the Shapley setting."""
    items = run.meta.get("summary", {}).get("unit_attribution", [])
    keep = ["prompt_id", "target", "target_value", "n_units", "units", "ig_gap",
            "shapley_exact", "shapley_permutations", "shapley_absent"]
    frame = pd.DataFrame(items)
    return frame[[c for c in keep if c in frame]]
