"""Frames and figures of a spans run (`tokenprobe spans`), shared by the dashboard, the report
and the CLI: a prompt's spans with each model's tokens, the spans where the models disagree
most, the summary, the text coloured per span and the surprisal scatter. Reads a run, computes
no measure (those are in `tokenprobe.analyses.spans`)."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from plotly.colors import sample_colorscale

from tokenprobe.analyses.figures import NO_VALUE, SEQUENTIAL, legend_html, token_colours
from tokenprobe.analyses.views import MissingProbe, readable_token
from tokenprobe.store import Run
from tokenprobe.tokens import display_text

COLOURINGS = {"surprisal_a": "surprisal under {a} (nats)",
              "surprisal_b": "surprisal under {b} (nats)",
              "surprisal_diff": "surprisal {b} - {a} (nats; red: {b} more surprised)",
              "jsd_byte": "JSD of {a} and {b}'s next-byte distributions at the span's first "
                          "byte (nats)"}
INEXACT = "1px dashed #333"


def require_spans(run: Run) -> pd.DataFrame:
    """`run.spans`, or MissingProbe naming `tokenprobe spans`."""
    if "spans" not in run.tables:
        raise MissingProbe("spans table", "spans", str(run.meta.get("model", "MODEL")))
    return run.spans


def model_names(run: Run) -> tuple[str, str]:
    """(model A, model B) of a spans run."""
    return str(run.meta.get("model", "A")), str(run.meta.get("model_b", "B"))


def shown_text(text: str, width: int | None = None) -> str:
    """A span's text safe to print, whitespace made visible (· ↵ ⇥), cut to `width`."""
    shown = readable_token(str(text))
    return shown if width is None or len(shown) <= width else shown[:width - 1] + "…"


def prompt_spans(run: Run, prompt_id: int) -> pd.DataFrame:
    """The prompt's rows of `spans`, plus `shown` (visible whitespace) and `tokens_a` /
    `tokens_b`: each model's tokens counted for the span, readable, joined by |."""
    spans = require_spans(run)
    rows = spans[spans.prompt_id == prompt_id].reset_index(drop=True)
    rows["shown"] = [shown_text(t) for t in rows.text]
    if "span_tokens" in run.tables:
        tokens = run.span_tokens[(run.span_tokens.prompt_id == prompt_id)
                                 & run.span_tokens.span_id.notna()]
        for side, group in tokens.groupby("model"):
            joined = group.groupby("span_id").token.agg(
                lambda t: "|".join(readable_token(x) for x in t))
            rows[f"tokens_{side}"] = rows.span_id.map(joined).fillna("").to_numpy()
    return rows


def colourings(frame: pd.DataFrame) -> list[str]:
    """The columns of a `prompt_spans` frame to colour the text by: both surprisals, their
    difference, and jsd_byte where the run has it (`tokenprobe spans --bytes`)."""
    return [c for c in COLOURINGS if c in frame and (c != "jsd_byte" or frame[c].notna().any())]


def disagreements(spans: pd.DataFrame, n: int = 5, *, exact_only: bool = True) -> pd.DataFrame:
    """The `n` spans with the largest |surprisal_diff| (only those exact for both models, by
    default): prompt_id, span_id, text, surprisal_a, surprisal_b, surprisal_diff, n_tokens_a,
    n_tokens_b, exact."""
    rows = spans[spans.exact] if exact_only else spans
    rows = rows[np.isfinite(rows.surprisal_diff)]
    order = rows.surprisal_diff.abs().sort_values(ascending=False, kind="stable").index[:n]
    return rows.loc[order, ["prompt_id", "span_id", "text", "surprisal_a", "surprisal_b",
                            "surprisal_diff", "n_tokens_a", "n_tokens_b",
                            "exact"]].reset_index(drop=True)


def run_summary(run: Run) -> dict:
    """The run's `summary.spans` (run.json), or the same figures from its spans table."""
    from tokenprobe.analyses.spans import summarize

    return run.meta.get("summary", {}).get("spans") or summarize(require_spans(run))


def summary_frame(run: Run) -> pd.DataFrame:
    """`run_summary` as one row, with both models' names."""
    a, b = model_names(run)
    return pd.DataFrame([{"model_a": a, "model_b": b, **run_summary(run)}])


def summary_line(summary: dict) -> str:
    """The summary figures as one line of text."""
    def num(key: str, fmt: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else format(value, fmt)

    return (f"  {summary['n_exact']} of {summary['n_spans']} spans exact for both models "
            f"({num('share_exact', '.1%')}; A {num('share_exact_a', '.1%')}, B "
            f"{num('share_exact_b', '.1%')}); over them mean |B - A| "
            f"{num('mean_abs_diff_exact', '.3f')} nats, mean B - A "
            f"{num('mean_diff_exact', '+.3f')}, Pearson {num('pearson_exact', '.3f')}, "
            f"Spearman {num('spearman_exact', '.3f')}; total A {num('surprisal_a', '.1f')}, "
            f"B {num('surprisal_b', '.1f')} nats"
            + (f"; mean JSD per first byte {num('mean_jsd_byte', '.4f')} nats"
               if "mean_jsd_byte" in summary else ""))


def _ink(background: str) -> str:
    """Black or white text, whichever reads on `background` ("rgb(r, g, b)" or "#rrggbb")."""
    if background.startswith("#"):
        r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (float(c) for c in background[background.index("(") + 1:-1].split(","))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _html_text(text: str) -> str:
    """A span's text as HTML: control characters escaped, tabs ⇥, newlines ↵ then a break."""
    return "↵<br>".join(html.escape(display_text(part.replace("\t", "⇥")))
                        for part in str(text).split("\n"))


def _colours(frame: pd.DataFrame, column: str) -> tuple[list[str], dict]:
    """Colours of `column` and the legend's scale: differences red-blue around 0, the two
    surprisals on one shared scale from 0 to the larger maximum (so A and B read alike)."""
    shared = ["surprisal_a", "surprisal_b"]
    if column not in shared or not all(c in frame for c in shared):
        return token_colours(frame[column], diverging=column.endswith("_diff"))
    both = frame[shared].to_numpy(dtype=float)
    finite = both[np.isfinite(both)]
    hi = float(finite.max()) if len(finite) and finite.max() > 0 else 1.0
    colours = [NO_VALUE if not np.isfinite(v) else
               sample_colorscale(SEQUENTIAL, [min(max(v / hi, 0.0), 1.0)])[0]
               for v in frame[column].to_numpy(dtype=float)]
    return colours, {"kind": "numeric", "lo": 0.0, "hi": hi, "log": False,
                     "colorscale": SEQUENTIAL}


def span_html(frame: pd.DataFrame, column: str, label: str | None = None, *,
              names: tuple[str, str] = ("A", "B")) -> str:
    """The prompt's text coloured per span by `column` of a `prompt_spans` frame
    (surprisal_a, surprisal_b: sequential; surprisal_diff, entropy_diff: red-blue around 0);
    spans not exact for both models are outlined dashed; each span's tooltip gives its
    characters, both surprisals, token counts and tokens. A legend follows."""
    label = label or COLOURINGS.get(column, column).format(a=names[0], b=names[1])
    colours, scale = _colours(frame, column)
    parts = []
    for row, colour in zip(frame.itertuples(index=False), colours):
        tip = (f"span {row.span_id} [{row.char_start}, {row.char_end}) {shown_text(row.text)!r}"
               f" | {names[0]}: {row.surprisal_a:.3f} nats, {row.n_tokens_a} token(s) "
               f"{getattr(row, 'tokens_a', '')} | {names[1]}: {row.surprisal_b:.3f} nats, "
               f"{row.n_tokens_b} token(s) {getattr(row, 'tokens_b', '')} | B - A "
               f"{row.surprisal_diff:+.3f}" + ("" if row.exact else " | NOT EXACT"))
        border = "1px solid transparent" if row.exact else INEXACT
        parts.append(f'<span class="tp-span" data-span="{row.span_id}" data-exact='
                     f'"{str(bool(row.exact)).lower()}" title="{html.escape(tip)}" style="'
                     f"background:{colour};color:{_ink(colour)};border:{border};"
                     'border-radius:3px;padding:1px 0">'
                     f"{_html_text(row.text)}</span>")
    body = ('<div class="tp-spans" style="font-family:ui-monospace,monospace;font-size:15px;'
            'line-height:2.1;white-space:pre-wrap">' + "".join(parts) + "</div>")
    note = ('<div style="font-size:12px;color:#555">dashed outline: not exact (a token of '
            f"{html.escape(names[0])} or {html.escape(names[1])} straddles a span edge; its "
            "surprisal counts where it starts)</div>")
    return body + legend_html(scale, label) + note


def surprisal_scatter(spans: pd.DataFrame, names: tuple[str, str] = ("A", "B"),
                      title: str | None = None) -> go.Figure:
    """surprisal_b against surprisal_a, one point per span, exact and inexact spans as two
    series, with the line y = x; the hover gives the span's text and prompt."""
    fig = go.Figure()
    finite = spans[np.isfinite(spans.surprisal_a) & np.isfinite(spans.surprisal_b)]
    for exact, label, colour in ((True, "exact for both", "#1f77b4"),
                                 (False, "not exact", "#ff7f0e")):
        rows = finite[finite.exact == exact]
        fig.add_trace(go.Scatter(
            x=rows.surprisal_a, y=rows.surprisal_b, mode="markers", name=label,
            marker={"color": colour, "size": 7, "opacity": 0.8,
                    "symbol": "circle" if exact else "x"},
            customdata=np.stack([rows.prompt_id, rows.span_id,
                                 [shown_text(t, 40) for t in rows.text]], 1)
            if len(rows) else None,
            hovertemplate=("prompt %{customdata[0]}, span %{customdata[1]}: "
                           "'%{customdata[2]}'<br>" + f"{names[0]} %{{x:.3f}} nats<br>"
                           f"{names[1]} %{{y:.3f}} nats<extra></extra>")))
    top = float(max(finite.surprisal_a.max(), finite.surprisal_b.max(), 1.0)) if len(finite) \
        else 1.0
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="y = x",
                             line={"color": "#999", "dash": "dot"}, hoverinfo="skip"))
    fig.update_layout(title=title or f"Surprisal per span: {names[1]} against {names[0]}",
                      xaxis_title=f"{names[0]} surprisal (nats)",
                      yaxis_title=f"{names[1]} surprisal (nats)", height=460)
    return fig
