"""Layout of figures at a fixed size: tick labels thinned to fit, readable titles, margins.

The rule (`thin_ticks`): a tick label takes `CHAR_EM` font sizes per character across and
`LINE_EM` font sizes up and down; neighbouring labels need a further `GAP_EM` between them. On
an axis `axis_pt` long with n labels, the step between labelled ticks is the smallest of
1, 2, 5, 10, 20, 50, ... for which ceil(n / step) labels of that extent fit. A position axis
abbreviates its labels to `MAX_CHARS` characters ("…") and turns them through 90 degrees when
that needs fewer ticks dropped. `fit_figure` applies it to every axis (and colour bar) that
carries explicit `tickvals`, with margins computed from the labels, so that what the rule
assumed is what plotly draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import plotly.graph_objects as go

CHAR_EM = 0.6   # width of a label character, in font sizes
LINE_EM = 1.2   # height of a label line, in font sizes
GAP_EM = 0.6    # free space between neighbouring labels, in font sizes
MAX_CHARS = 8   # a longer tick label is abbreviated with "…"
PT_PER_PX = 0.75  # plotly's CSS pixels are 1/96 in

# column (or short label) -> axis / colour-bar title with units
TITLES = {
    "sink_mass": "sink mass (attention to key 0)",
    "attn_entropy": "attention entropy (nats)",
    "value_drain_sink": "value drain, sink (fraction)",
    "value_drain_rest": "value drain, rest (fraction)",
    "resid_norm": "||h|| (residual L2 norm)",
    "||h||": "||h|| (residual L2 norm)",
    "max_abs": "max |h| (activation)",
    "median_abs": "median |h| (activation)",
    "abs_value": "|h| (activation)",
    "cos_to_first": "cosine to token 0",
    "attn_received": "attention received (mean per query)",
    "attn_received_norm": "attention received (x uniform)",
    "entropy": "entropy (nats)",
    "critical_success": "success rate (fraction of rollouts)",
    "sink_rate": "sink rate (% of heads)",
    "layer": "layer (block output)",
    "head": "head",
    "pos": "position (token)",
    "position": "position (token)",
    "B - A": "difference (B - A)",
}


def human_title(name: str) -> str:
    """The readable title (with units) of column `name`; unknown names lose their underscores."""
    return TITLES.get(name, str(name).replace("_", " "))


def abbreviate(label: str, max_chars: int = MAX_CHARS) -> str:
    """`label` cut to `max_chars` characters, the last one an ellipsis when cut."""
    label = str(label)
    return label if len(label) <= max_chars else label[:max_chars - 1] + "…"


def nice_step(n: int, fits: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... with ceil(n / step) <= fits (fits >= 1)."""
    fits = max(1, fits)
    for power in range(0, 12):
        for base in (1, 2, 5):
            step = base * 10 ** power
            if math.ceil(n / step) <= fits:
                return step
    return n


@dataclass(frozen=True)
class Ticks:
    """Thinned ticks: the indices kept, their (abbreviated) labels and the label angle."""

    keep: list[int]
    text: list[str]
    angle: int  # 0 (flat) or -90 (turned; x axes only)


def extent_pt(text: list[str], font_pt: float, *, across: bool) -> float:
    """Space one label needs along the axis: its width when `across` (flat on an x axis),
    else its line height; plus the gap to the next."""
    width = max((len(t) for t in text), default=1) * CHAR_EM if across else LINE_EM
    return (width + GAP_EM) * font_pt


def thin_ticks(labels: list[str], axis_pt: float, font_pt: float, *, horizontal: bool,
               rotate: bool = True) -> Ticks:
    """Which of `labels` (one per tick, evenly spaced along `axis_pt`) to show.

    A horizontal (x) axis keeps labels flat unless turning them through 90 degrees (allowed by
    `rotate`) leaves more of them; a vertical axis has flat labels stacked by line height.
    """
    text = [abbreviate(t) for t in labels]
    n = len(text)
    if n == 0:
        return Ticks([], [], 0)
    pitch = axis_pt / n  # distance between neighbouring ticks

    def step_for(across: bool) -> int:
        return nice_step(n, int(axis_pt // extent_pt(text, font_pt, across=across)) or 1) \
            if extent_pt(text, font_pt, across=across) > pitch else 1

    angle, step = 0, step_for(horizontal)
    if horizontal and rotate and step > 1:
        turned = step_for(False)
        if turned < step:
            angle, step = -90, turned
    keep = list(range(0, n, step))
    return Ticks(keep, [text[i] for i in keep], angle)


def _label_px(text: list[str], font_px: float) -> float:
    return max((len(t) for t in text), default=1) * CHAR_EM * font_px


def wrap_title(text: str, max_chars: int) -> str:
    """`text` broken at spaces into lines (joined by <br>) of at most `max_chars` characters."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def _axes(fig: go.Figure, letter: str) -> list[str]:
    names = [k for k in fig.layout.to_plotly_json() if k.startswith(letter + "axis")]
    return sorted(set(names) | {letter + "axis"})


def _ticks_of(axis) -> tuple[list, list[str]] | None:
    vals = axis.tickvals
    if vals is None or len(vals) < 2:
        return None
    text = list(axis.ticktext) if axis.ticktext is not None else [str(v) for v in vals]
    return list(vals), [str(t) for t in text]


def fit_figure(fig: go.Figure, *, width: int, height: int, font_px: float,
               title: bool) -> go.Figure:
    """Lay `fig` out at `width` x `height` px with fonts of `font_px`: margins from its labels,
    every axis and colour bar with explicit ticks thinned by `thin_ticks`, y-axis and
    colour-bar titles wrapped to the plot height, the legend above the plot. Changes and
    returns `fig`."""
    original = {name: _ticks_of(fig.layout[name]) for name in _axes(fig, "x") + _axes(fig, "y")}
    titles = {name: (fig.layout[name].title.text or "").replace("<br>", " ")
              for name in _axes(fig, "y")}
    title_px = fig.layout.font.size or font_px * 1.2
    lines = 1
    for _ in range(3):  # a wrapped y title widens the left margin, which changes the rest
        plot_w, plot_h, box = _lay_out(fig, original, lines, width, height, font_px, title)
        wrapped = {n: wrap_title(t, max(8, int(plot_h // (CHAR_EM * title_px))))
                   for n, t in titles.items() if t}
        need = max([t.count("<br>") + 1 for t in wrapped.values()] or [1])
        if need <= lines:
            break
        lines = need
    for name, text in wrapped.items():
        fig.layout[name].title.text = text
    for trace in fig.data:
        if trace.type == "heatmap" and trace.showscale is not False:
            _fit_colorbar(trace, plot_h, font_px)
    for note in fig.layout.annotations:  # subplot titles
        note.update(font={"size": font_px}, text=abbreviate(note.text, int(
            plot_w / max(1, len(fig.layout.annotations)) // (CHAR_EM * font_px))))
    line = LINE_EM * font_px
    above = (line * 1.3 / plot_h) if fig.layout.annotations else 0  # over subplot titles
    fig.update_layout(margin={**box, "pad": 0},
                      legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1 + above,
                              "yanchor": "bottom", "font": {"size": font_px},
                              "title": {"side": "left"}})
    return fig


def _lay_out(fig: go.Figure, original: dict, title_lines: int, width: int, height: int,
             font_px: float, title: bool) -> tuple[float, float, dict]:
    """Margins and thinned ticks (from each axis' `original` ticks) with y titles of
    `title_lines` lines; returns the plot width, height (px) and the margins."""
    font_pt = font_px * PT_PER_PX
    line = LINE_EM * font_px
    has_bar = any(t.type == "heatmap" and t.showscale is not False for t in fig.data)
    y_text = [abbreviate(t) for name in _axes(fig, "y")
              for t in (original.get(name) or ([], []))[1]] or ["0.00"]
    left = line * 1.3 * title_lines + _label_px(y_text, font_px) + 8
    right = 4 + 8 + 4 + _label_px(["0.000"], font_px) + 2 * line + 6 if has_bar else 10.0
    legend_rows = _legend_rows(fig, width - left - right, font_px)
    top = ((line * 1.6 if title else 6) + legend_rows * line * 1.15
           + (line * 1.3 if fig.layout.annotations else 0))  # subplot titles
    plot_w = width - left - right
    tallest = line
    for ticks in _thin_axes(fig, original, "x", plot_w, font_pt):
        if ticks.angle:
            tallest = max(tallest, _label_px(ticks.text, font_px))
    bottom = line * 1.3 + 6 + tallest + 4  # x title, tick labels
    plot_h = height - top - bottom
    _thin_axes(fig, original, "y", plot_h, font_pt)
    return plot_w, plot_h, {"l": left, "r": right, "t": top, "b": bottom}


def _thin_axes(fig: go.Figure, original: dict, letter: str, length_px: float,
               font_pt: float) -> list:
    """Thin the tick labels of every `letter` ("x" or "y") axis of `fig` to fit its share of
    `length_px` (`thin_ticks`; x labels may stand upright); the ticks kept, per axis."""
    kept = []
    for name in _axes(fig, letter):
        axis, found = fig.layout[name], original.get(name)
        if found is None:
            continue
        vals, text = found
        dom = axis.domain or (0, 1)
        ticks = thin_ticks(text, length_px * (dom[1] - dom[0]) * PT_PER_PX, font_pt,
                           horizontal=letter == "x")
        axis.update(tickvals=[vals[i] for i in ticks.keep], ticktext=ticks.text,
                    automargin=False, **({"tickangle": ticks.angle} if letter == "x" else {}))
        kept.append(ticks)
    return kept


def _fit_colorbar(trace, plot_h: float, font_px: float) -> None:
    bar = trace.colorbar
    title = bar.title.text or ""
    max_chars = max(8, int(plot_h // (CHAR_EM * font_px)))
    bar.update(title={"text": wrap_title(title.replace("<br>", " "), max_chars),
                      "side": "right", "font": {"size": font_px}},
               thickness=8, len=1, lenmode="fraction", x=1, xanchor="left", xpad=4,
               tickfont={"size": font_px})
    found = (list(bar.tickvals), [str(t) for t in bar.ticktext]) \
        if bar.tickvals is not None and bar.ticktext is not None else None
    if found is None:
        return
    vals, text = found
    fits = int(plot_h * PT_PER_PX // extent_pt(text, font_px * PT_PER_PX, across=False))
    if len(vals) > fits:  # a log scale keeps its powers of ten first
        powers = [i for i, t in enumerate(text) if t.lstrip("-").startswith("1")]
        vals, text = [vals[i] for i in powers], [text[i] for i in powers]
        step = nice_step(len(vals), fits)
        vals, text = vals[::step], text[::step]
    bar.update(tickvals=vals, ticktext=text)


def _legend_rows(fig: go.Figure, plot_w: float, font_px: float) -> int:
    """Rows a horizontal legend of `fig`'s shown entries takes across `plot_w` px."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False
             and (t.showlegend or len(fig.data) > 1)]
    if not names or fig.layout.showlegend is False:
        return 0
    rows, used = 1, 0.0
    for name in names:
        item = 40 + len(str(name)) * CHAR_EM * font_px
        if used and used + item > plot_w:
            rows, used = rows + 1, 0.0
        used += item
    return rows
