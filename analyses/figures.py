"""Figures for the dashboard and reports: plotly figures and the coloured token view (HTML).

Each builder takes a frame from `tokenprobe.analyses.views` and returns a figure (or an HTML
string for the token view); none reads a run or computes a measure.
"""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale

from tokenprobe.analyses.figure_layout import human_title

SEQUENTIAL = "YlOrRd"
DIVERGING = "RdBu_r"
NO_VALUE = "#ffffff"
CATEGORY_COLOURS = {"low": "#c6dbef", "mid": "#fdd49e", "high": "#ef6548",
                    "forking": "#ef6548", "not forking": "#f0f0f0"}


def _text_colour(rgb: str) -> str:
    r, g, b = (int(float(c)) for c in rgb[rgb.index("(") + 1:-1].split(","))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def token_colours(values: pd.Series, *, kind: str = "numeric", log: bool = False,
                  diverging: bool = False) -> tuple[list[str], dict]:
    """Background colour per token and the legend's scale.

    Numeric values map linearly (or on log10 when `log`) from their min to max onto YlOrRd,
    or symmetrically around 0 onto RdBu when `diverging`; NA is white. Categories take fixed
    colours (band, forking) or plotly's qualitative palette. Returns (colours, scale) where
    scale holds kind, and lo/hi (numeric) or the category -> colour map.
    """
    if kind == "category":
        cats = [c for c in CATEGORY_COLOURS if c in set(values.dropna())]
        cats += sorted(set(values.dropna().astype(str)) - set(cats))
        palette = {c: CATEGORY_COLOURS.get(c, qualitative.Pastel[i % len(qualitative.Pastel)])
                   for i, c in enumerate(cats)}
        return [NO_VALUE if pd.isna(v) else palette[str(v)] for v in values], \
            {"kind": "category", "colours": palette}
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    numbers = numbers.where(np.isfinite(numbers))  # NaN and inf: no colour (the hover says which)
    if log:
        numbers = np.log10(numbers.where(numbers > 0))
    finite = numbers.dropna()
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if diverging:
        bound = max(abs(lo), abs(hi)) or 1.0
        lo, hi, scale = -bound, bound, DIVERGING
    else:
        scale = SEQUENTIAL
    span = (hi - lo) or 1.0
    colours = [NO_VALUE if pd.isna(v) else sample_colorscale(scale, [(v - lo) / span])[0]
               for v in numbers]
    return colours, {"kind": "numeric", "lo": lo, "hi": hi, "log": log, "colorscale": scale}


def _format(value: object) -> str:
    if pd.isna(value):
        return "n/a"
    if isinstance(value, (float, np.floating)) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (float, np.floating)):
        return f"{value:.6g}"
    return str(value)


def token_html(frame: pd.DataFrame, label: str, *, kind: str = "numeric", log: bool = False,
               diverging: bool = False, marked: frozenset[int] = frozenset()) -> str:
    """The prompt as coloured tokens with exact values on hover, followed by a legend.

    `frame` is a `views.token_metric_frame` (pos, token_id, token, is_special, shown, value).
    Whitespace is visible (· ↵ ⇥), a newline token also breaks the line, special tokens are
    boxed, tokens at `marked` positions (e.g. the critical token) outlined in red, and each
    token's tooltip gives its position, exact text, id and value (or a `tip` column's text).
    """
    colours, scale = token_colours(frame.value, kind=kind, log=log, diverging=diverging)
    spans = []
    for row, colour in zip(frame.itertuples(index=False), colours):
        rgb = colour if colour.startswith("rgb") else _hex_to_rgb(colour)
        border = ("2px solid #d62728" if row.pos in marked else
                  "1px dashed #888" if row.is_special else "1px solid transparent")
        tip = row.tip if isinstance(getattr(row, "tip", None), str) else (
               f"pos {row.pos} | token '{row.token}' (id {row.token_id})"
               f"{' special' if row.is_special else ''}{' MARKED' if row.pos in marked else ''}"
               f" | {label}: {_format(row.value)}"
               + (f" | top here: {row.alternatives}" if isinstance(
                   getattr(row, "alternatives", None), str) else ""))
        spans.append(
            f'<span class="tp-tok" data-pos="{row.pos}" title="{html.escape(tip)}" '
            f'style="background:{colour};color:{_text_colour(rgb)};border:{border};'
            f'border-radius:3px;padding:0 2px;margin:1px;white-space:pre;display:inline-block">'
            f"{html.escape(row.shown)}</span>" + ("<br>" if "\n" in _raw(row) else ""))
    body = ('<div class="tp-tokens" style="font-family:ui-monospace,monospace;font-size:15px;'
            'line-height:2.2">' + "".join(spans) + "</div>")
    return body + legend_html(scale, label)


def _raw(row) -> str:
    return getattr(row, "raw", row.token)


def legend_html(scale: dict, label: str) -> str:
    """The colour legend: a gradient with its end values, or one swatch per category."""
    swatch = ('<span style="display:inline-block;width:14px;height:14px;background:{c};'
              'border:1px solid #999;vertical-align:middle;margin:0 4px 0 10px"></span>{t}')
    if scale["kind"] == "category":
        items = "".join(swatch.format(c=c, t=html.escape(t)) for t, c in scale["colours"].items())
    else:
        stops = ", ".join(sample_colorscale(scale["colorscale"], list(np.linspace(0, 1, 7))))
        lo, hi = scale["lo"], scale["hi"]
        ends = ((f"{10 ** lo:.4g}", f"{10 ** hi:.4g}") if scale["log"]
                else (f"{lo:.4g}", f"{hi:.4g}"))
        items = (f'{ends[0]} <span style="display:inline-block;width:180px;height:12px;'
                 f'vertical-align:middle;background:linear-gradient(to right, {stops})"></span> '
                 f'{ends[1]}{" (log scale)" if scale["log"] else ""}')
    items += swatch.format(c=NO_VALUE, t="no value")
    return (f'<div class="tp-legend" style="font-size:13px;margin-top:6px">'
            f"<b>{html.escape(label)}</b>: {items}</div>")


def _hex_to_rgb(colour: str) -> str:
    h = colour.lstrip("#")
    h = "".join(c * 2 for c in h) if len(h) == 3 else h
    return f"rgb({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)})"


def heatmap(grid: pd.DataFrame, *, title: str, x_title: str, value: str, log: bool = False,
            diverging: bool = False, x_labels: list[str] | None = None) -> go.Figure:
    """A layer-indexed grid as a heatmap (layer 0 at the bottom).

    `log` colours log10 of the values (ticks in the values' units) and keeps exact values in
    the hover; `diverging` centres a red-blue scale on 0 (differences); `x_labels` names the
    columns (e.g. tokens for positions). NaN and inf cells are left uncoloured and marked with
    a grey x (hover: the value), so an overflowed model reads as such, not as a colour.
    """
    values = grid.to_numpy(dtype=float)
    finite = np.where(np.isfinite(values), values, np.nan)
    z = np.log10(np.where(finite > 0, finite, np.nan)) if log else finite
    x = [str(c) for c in grid.columns]
    ticks = [f"{c}:{t}" for c, t in zip(x, x_labels)] if x_labels is not None else x
    colorbar: dict = {"title": {"text": human_title(value)}}
    if log and np.isfinite(z).any():
        powers = range(math.floor(np.nanmin(z)), math.ceil(np.nanmax(z)) + 1)
        marks = [m * 10.0 ** p for p in powers for m in (1, 2, 5)]  # 1-2-5 ticks per decade
        colorbar |= {"tickvals": [math.log10(t) for t in marks],
                     "ticktext": [f"{t:.3g}" for t in marks]}
    trace = go.Heatmap(
        z=z, x=ticks, y=list(grid.index), customdata=values, colorbar=colorbar,
        colorscale=DIVERGING if diverging else "Viridis", zmid=0 if diverging else None,
        hovertemplate=f"layer %{{y}}<br>{x_title} %{{x}}<br>{value} %{{customdata:.6g}}"
                      "<extra></extra>")
    fig = go.Figure(trace)
    rows, cols = np.nonzero(np.isinf(values) | (np.isnan(values) & _reached(values)))
    if len(rows):
        fig.add_trace(go.Scatter(
            x=[ticks[c] for c in cols], y=[grid.index[r] for r in rows], mode="markers",
            name="NaN / inf", marker={"symbol": "x-thin", "size": 9, "color": "#555",
                                      "line": {"width": 2, "color": "#555"}},
            text=[_format(values[r, c]) for r, c in zip(rows, cols)], showlegend=True,
            hovertemplate=f"layer %{{y}}<br>{x_title} %{{x}}<br>{value} %{{text}} (non-finite)"
                          "<extra></extra>"))
    fig.update_layout(title=title + (" (log colour scale)" if log else ""),
                      xaxis_title=human_title(x_title), yaxis_title=human_title("layer"),
                      height=460, margin={"l": 50, "r": 20, "t": 50, "b": 50})
    fig.update_xaxes(type="category", tickvals=ticks, ticktext=ticks)  # all; thinned to fit
    fig.update_yaxes(tickvals=list(grid.index), ticktext=[str(i) for i in grid.index])
    return fig


def _reached(values: np.ndarray) -> np.ndarray:
    """Cells a NaN there means a non-finite value rather than a cell with no observation: a
    column (e.g. a position) that holds some number in another row (layer)."""
    return np.broadcast_to(~np.isnan(values).all(axis=0, keepdims=True), values.shape)


def marker_size(abs_value) -> np.ndarray:
    """Marker size (px) of a massive activation: 2 + 1.5 log10 |value| (|value| in 1..1e10)."""
    return 2 + 1.5 * np.log10(np.clip(np.asarray(abs_value, dtype=float), 1, 1e10))


def massive_figure(points: pd.DataFrame, *, n_layers: int, tokens: list[str],
                   size_legend: bool = False) -> go.Figure:
    """Massive activations as (layer, pos) points, one colour per dim, size by log |value|;
    `tokens` (the prompt's, readable) label the position axis. The powers of ten the values
    span are kept in `layout.meta`; with `size_legend` (and in every static export,
    `add_size_legend`) grey legend entries give the marker size of each."""
    fig = go.Figure()
    for i, (dim, rows) in enumerate(points.groupby("dim")):
        fig.add_trace(go.Scatter(
            x=rows.layer, y=rows.pos, mode="markers", name=f"dim {dim}",
            marker={"size": marker_size(rows.abs_value),
                    "color": qualitative.Plotly[i % len(qualitative.Plotly)]},
            customdata=np.stack([rows.value, rows.ratio_to_median, rows.token.astype(str)], 1),
            hovertemplate=(f"dim {dim}<br>layer %{{x}}, pos %{{y}} (%{{customdata[2]}})<br>"
                           "value %{customdata[0]:.6g}<br>ratio to median %{customdata[1]:.4g}"
                           "<extra></extra>")))
    fig.update_layout(title="Massive activations (layer, pos, dim)",
                      xaxis_title=human_title("layer"), yaxis_title=human_title("pos"),
                      height=min(900, max(320, 120 + 18 * len(tokens))), showlegend=True)
    layers = list(range(n_layers))
    fig.update_xaxes(range=[-0.5, n_layers - 0.5], tickvals=layers,
                     ticktext=[str(v) for v in layers])
    fig.update_yaxes(range=[len(tokens) - 0.5, -0.5], tickvals=list(range(len(tokens))),
                     ticktext=([f"{p}:{t}" for p, t in enumerate(tokens)] if len(tokens) <= 60
                               else [str(p) for p in range(len(tokens))]))
    fig.update_layout(meta={"size_powers": _size_powers(points.abs_value)})
    return add_size_legend(fig) if size_legend else fig


def add_size_legend(fig: go.Figure) -> go.Figure:
    """`fig` with grey legend entries `|h| 1e<p>` of the marker size of each power of ten
    in its `layout.meta["size_powers"]` (a `massive_figure`); any other figure, or one that
    has them, unchanged. Changes and returns `fig`."""
    meta = fig.layout.meta
    if not isinstance(meta, dict) or any(t.meta == "size" for t in fig.data):
        return fig
    for power in meta.get("size_powers", []):
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=f"|h| 1e{power}",
            marker={"size": float(marker_size([10.0 ** power])[0]), "color": "#999"},
            hoverinfo="skip", showlegend=True, meta="size"))
    return fig


def _size_powers(abs_values: pd.Series) -> list[int]:
    """Up to three powers of ten spanning the values, for the marker-size legend."""
    finite = abs_values[np.isfinite(abs_values) & (abs_values >= 1)]
    if finite.empty:
        return []
    lo, hi = math.floor(np.log10(finite.min())), math.ceil(np.log10(finite.max()))
    hi = min(max(hi, lo + 1), 10)
    powers = list(range(lo, hi + 1))
    return powers if len(powers) <= 3 else [powers[0], powers[len(powers) // 2], powers[-1]]


def sink_lifetimes_figure(bars: pd.DataFrame, *, n_layers: int) -> go.Figure:
    """Each sink token as a bar from its creation layer over its lifetime, coloured by kind."""
    fig = go.Figure()
    colours = {"primary": "#d62728", "secondary": "#1f77b4", "noise": "#aaaaaa"}
    for kind, rows in bars.groupby("kind"):
        fig.add_trace(go.Bar(
            y=rows.label, x=rows.lifetime, base=rows.creation_layer, orientation="h", name=kind,
            marker_color=colours.get(kind, "#2ca02c"),
            customdata=np.stack([rows.last_layer, rows.max_cos], 1),
            hovertemplate=("%{y}<br>layers %{base} to %{customdata[0]}<br>lifetime %{x}"
                           "<br>max |cos| %{customdata[1]:.3f}<extra></extra>")))
    fig.update_layout(title="Sink lifetimes (bar: creation layer, length: lifetime)",
                      xaxis_title=human_title("layer"), height=max(220, 60 + 28 * len(bars)),
                      barmode="overlay")
    layers = list(range(n_layers + 1))
    fig.update_xaxes(range=[0, n_layers], tickvals=layers, ticktext=[str(v) for v in layers])
    return fig


def critical_figure(prefixes: pd.DataFrame) -> go.Figure:
    """Rollout success rate per sampled prefix, the critical token(s) marked."""
    prefixes = prefixes[prefixes.critical_success.notna() | prefixes.critical]
    x = [f"{p}:{s}" for p, s in zip(prefixes.pos, prefixes.shown)]
    fig = go.Figure(go.Scatter(x=x, y=prefixes.critical_success, mode="lines+markers",
                               name="success rate",
                               hovertemplate="prefix to %{x}<br>success %{y:.3f}<extra></extra>"))
    marked = prefixes.critical.to_numpy()
    fig.add_trace(go.Scatter(x=[v for v, m in zip(x, marked) if m],
                             y=prefixes.critical_success[marked], mode="markers",
                             name="critical token", marker={"symbol": "star", "size": 16,
                                                            "color": "#d62728"}))
    fig.update_layout(title="Success rate per prefix", xaxis_title="prefix ending at token",
                      yaxis_title=human_title("critical_success"), yaxis_range=[-0.05, 1.05],
                      height=400)
    fig.update_xaxes(type="category", tickvals=x, ticktext=x)
    return fig


def sink_rate_curve_figure(curve: pd.DataFrame) -> go.Figure:
    """Sink rate against T, one line per model (a `analyses.sink_curve.sink_rate_curve` frame);
    the hover gives the T the texts actually reached."""
    fig = go.Figure()
    for i, (model, rows) in enumerate(curve.groupby("model", sort=False)):
        fig.add_trace(go.Scatter(
            x=rows["T"], y=rows.sink_rate, mode="lines+markers", name=str(model),
            marker_color=qualitative.Plotly[i % len(qualitative.Plotly)],
            customdata=np.stack([rows.T_reached_min, rows.T_reached_max, rows.eps], 1),
            hovertemplate=(f"{model}<br>T %{{x}} (reached %{{customdata[0]}} to "
                           "%{customdata[1]})<br>sink rate %{y:.2f}%<br>eps %{customdata[2]}"
                           "<extra></extra>")))
    fig.update_layout(title="Sink rate against T (Gu et al.'s Sink_1^eps)",
                      xaxis_title="T (tokens)",
                      yaxis_title=human_title("sink_rate"), yaxis_range=[0, 100], height=400)
    fig.update_xaxes(type="log", tickvals=sorted(curve["T"].unique()))
    return fig


QUADRANT_COLOURS = {"high_H_high_D": "#d62728", "high_H_low_D": "#ff7f0e",
                    "low_H_high_D": "#1f77b4", "low_H_low_D": "#bdbdbd"}


def tip_figure(points: pd.DataFrame) -> go.Figure:
    """TIP's plane: each scored token's student entropy H / ln V against the two models' JSD
    / ln 2, one colour per quadrant (a `two_model_views.tip_points` frame)."""
    fig = go.Figure()
    quadrants = points.tip_quadrant if "tip_quadrant" in points else pd.Series(
        "tokens", index=points.index)
    for quadrant in dict.fromkeys([*QUADRANT_COLOURS, *quadrants.dropna().unique()]):
        rows = points[quadrants == quadrant]
        if not len(rows):
            continue
        fig.add_trace(go.Scatter(
            x=rows.norm_entropy, y=rows.norm_jsd, mode="markers", name=str(quadrant),
            marker={"size": 5, "color": QUADRANT_COLOURS.get(quadrant, "#636efa"),
                    "opacity": 0.75},
            customdata=np.stack([rows.prompt_id, rows.pos, rows.token.astype(str)], 1),
            hovertemplate=("prompt %{customdata[0]}, pos %{customdata[1]}: %{customdata[2]}"
                           "<br>H / ln V %{x:.3f}<br>JSD / ln 2 %{y:.3f}<extra></extra>")))
    fig.update_layout(title="TIP: entropy against divergence", height=420,
                      xaxis_title="student entropy H / ln V",
                      yaxis_title="JSD(student, teacher) / ln 2", legend_title="quadrant")
    return fig

