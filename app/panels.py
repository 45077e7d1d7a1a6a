"""Streamlit panels: one function per view of one prompt of a run, each with its empty state.

Every panel gets its frame from `tokenprobe.analyses.views` and its figure from
`tokenprobe.analyses.figures`; panels only lay them out, with CSV / Parquet downloads.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st

from tokenprobe.analyses import figures, head_pattern, views
from tokenprobe.analyses.views import METRICS, MissingProbe
from tokenprobe.app import runs
from tokenprobe.store import Run
from tokenprobe.tokens import display_text

LOG_COLUMNS = {"resid_norm", "max_abs"}
MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:])")  # characters Markdown may act on


def plain(value: object) -> str:
    """Text from a run (run.json fields, tokens) shown as itself in Markdown: control
    characters escaped and Markdown's special characters backslashed, so a crafted run cannot
    inject links or images into the page."""
    return MARKDOWN.sub(r"\\\1", display_text(str(value)))


def empty_state(err: MissingProbe) -> None:
    """A missing probe: what is missing, which probe makes it, and the command."""
    if err.command is None:
        st.info(err.reason)
        return
    st.info(err.reason + " Make a run with it:")
    st.code(err.command, language="bash")


def downloads(frame: pd.DataFrame, name: str, key: str) -> None:
    """CSV and Parquet download buttons for `frame`."""
    left, right, _ = st.columns([2, 2, 3])  # wide enough for "Parquet" in half a page
    left.download_button("CSV", runs.frame_bytes(frame, "csv"), f"{name}.csv", "text/csv",
                         key=f"{key}-csv")
    right.download_button("Parquet", runs.frame_bytes(frame, "parquet"), f"{name}.parquet",
                          "application/octet-stream", key=f"{key}-parquet")


def n_layers(run: Run) -> int:
    return int(run.meta.get("n_layers") or 0)


def token_view(run: Run, prompt_id: int, metric: str, layer: int | None, key: str) -> None:
    """The prompt's tokens coloured by `metric`, exact values on hover, legend below."""
    spec = views.metric_spec(metric)
    try:
        frame = views.token_metric_frame(run, prompt_id, metric, layer=layer)
    except MissingProbe as err:
        return empty_state(err)
    label = spec.label if layer is None else f"{spec.column} at layer {layer}"
    marked = frozenset()
    if metric == "critical":  # outline the critical token
        prefixes = views.critical_prefixes(run, prompt_id)
        marked = frozenset(int(p) for p in prefixes.pos[prefixes.critical])
        label += "; critical token outlined in red"
    st.html(figures.token_html(frame, label, kind=spec.kind, log=spec.log, marked=marked))
    downloads(frame, f"tokens_{metric}_p{prompt_id}", key)


def token_metric_picker(run: Run, key: str) -> tuple[str, int | None]:
    """Metric (the per-token measures the run holds: the featured ones first; a caption says
    which command adds the others) and, for layer metrics, the layer (default: the aggregate
    over layers)."""
    left, right = st.columns(2)
    offered = views.available_metrics(run) or list(METRICS)[:1]  # none: its empty state
    metric = left.selectbox("Colour tokens by", offered, key=f"{key}-metric",
                            format_func=lambda m: f"{m}: {views.metric_spec(m).label}")
    missing = views.missing_metrics(run)
    if missing:
        adds: dict[str, list[str]] = {}
        for name, command in missing.items():
            adds.setdefault(command, []).append(name)
        left.caption("Not in this run: " + "; ".join(
            f"{', '.join(names)} (`{command}`)" for command, names in adds.items()))
    layer = None
    if views.metric_spec(metric).table == "token_layers" and n_layers(run):
        choice = right.selectbox("Layer", ["all"] + list(range(n_layers(run))),
                                 key=f"{key}-layer",
                                 format_func=lambda v: (f"all ({views.metric_spec(metric).over_layers} "
                                                        "over layers)") if v == "all" else str(v))
        layer = None if choice == "all" else int(choice)
    return metric, layer


def tip_view(run: Run, key: str) -> None:
    """TIP's plane of a two-model run: every scored token's H / ln V against JSD / ln 2,
    coloured by quadrant; nothing for a run without a compare model."""
    if "jsd" not in run.tables["tokens"].columns:
        return
    from tokenprobe.analyses import two_model_views
    from tokenprobe.analyses.figures import tip_figure

    points = two_model_views.tip_points(run)
    st.subheader("TIP: entropy against divergence (two-model run)")
    st.dataframe(two_model_views.two_model_summary(run), hide_index=True)
    fig = tip_figure(points)
    st.plotly_chart(fig, key=f"{key}-tip")
    downloads(points, "tip_points", f"{key}-tip")


def heads_view(run: Run, prompt_id: int, column: str, key: str) -> None:
    """Layer x head heatmap of a `heads` column, with the prompt's sink rate."""
    try:
        grid = views.head_grid(run, prompt_id, column)
    except MissingProbe as err:
        return empty_state(err)
    st.plotly_chart(figures.heatmap(grid, title=f"{column} per layer and head", x_title="head",
                                    value=column), key=f"{key}-fig")
    downloads(runs.grid_table(grid, column), f"heads_{column}_p{prompt_id}", key)


def head_pattern_view(run: Run, prompt_id: int, key: str, *, load: Callable,
                      pattern: Callable[[str, tuple[int, ...], int, int], np.ndarray]) -> None:
    """One head's full attention pattern on the prompt, computed on demand from the run's model
    (`load(model)`, `pattern(model, ids, layer, head)`: the dashboard's cached
    `head_pattern.head_pattern`) for display only: the prompt's tokens coloured by the
    attention the chosen query gives each key, and the query x key heatmap, sink column marked."""
    st.subheader("One head's attention pattern")
    model, ids = views.model_of(run), head_pattern.prompt_ids(run, prompt_id)
    try:
        head_pattern.check_length(len(ids))
    except ValueError as err:
        return st.info(str(err))
    if not st.toggle(f"Compute it with {model} (for display; not stored in the run)",
                     key=f"{key}-on"):
        return
    try:
        loaded = load(model)
    except (RuntimeError, ValueError, OSError) as err:  # ModelError is a RuntimeError
        return st.error(f"cannot load the run's model {model!r}: {err}")
    if run.meta.get("weights_fingerprint") not in (None, loaded.fingerprint):
        st.warning(f"The weights of {model!r} loaded now differ from the run's "
                   f"({plain(run.meta['weights_fingerprint'])}); the pattern is of the new ones.")
    n_layers, n_heads = head_pattern.head_counts(loaded)
    tokens = views.prompt_tokens(run, prompt_id)
    left, middle, right = st.columns(3)
    layer = left.selectbox("Layer", list(range(n_layers)), key=f"{key}-layer")
    head = middle.selectbox("Head", list(range(n_heads)), key=f"{key}-head")
    query = right.selectbox("Query position (what it attends to)", list(tokens.pos),
                            index=len(tokens) - 1, key=f"{key}-query",
                            format_func=lambda p: f"{p}: {tokens.shown[p]}")
    weights = pattern(model, tuple(ids), layer, head)
    sinks = head_pattern.sink_keys(run, prompt_id)
    st.html(figures.token_html(head_pattern.query_frame(tokens, weights, query),
                               f"attention from query {query} (outlined), layer {layer} head "
                               f"{head}", marked=frozenset({query})))
    st.plotly_chart(head_pattern.pattern_figure(
        weights, list(tokens.shown), sinks=sinks,
        title=f"Layer {layer} head {head}: attention of each query (row) to each key (column)"),
        key=f"{key}-fig")
    st.caption("Sink column outlined in red: " + ", ".join(
        f"key {p} ({plain(tokens.shown[p])}, {why})" for p, why in sinks.items()
        if p < len(tokens)))


def layers_view(run: Run, prompt_id: int, column: str, key: str) -> None:
    """Layer x position heatmap of a `token_layers` column, tokens on the x axis."""
    try:
        grid = views.layer_grid(run, prompt_id, column)
    except MissingProbe as err:
        return empty_state(err)
    shown = views.prompt_tokens(run, prompt_id).set_index("pos").shown
    st.plotly_chart(figures.heatmap(grid, title=f"{column} per layer and position",
                                    x_title="position", value=column,
                                    log=column in LOG_COLUMNS,
                                    x_labels=list(shown.reindex(grid.columns))),
                    key=f"{key}-fig")
    downloads(runs.grid_table(grid, column), f"token_layers_{column}_p{prompt_id}", key)


def massive_view(run: Run, prompt_id: int, key: str) -> None:
    """Massive activations as (layer, pos, dim) points, and their rows."""
    try:
        points = views.massive_points(run, prompt_id)
    except MissingProbe as err:
        return empty_state(err)
    if points.empty:
        config = next((p for p in run.meta.get("probes", []) if p.get("name") == "activations"),
                      {})
        st.info("No massive activations in this prompt under the criterion "
                f"(|h| > {config.get('abs_threshold', 100)} and > "
                f"{config.get('median_ratio', 1000)} x the median |h| of its layer); the Layers "
                "tab shows max_abs per layer.")
        return
    shown = list(views.prompt_tokens(run, prompt_id).shown)
    st.plotly_chart(figures.massive_figure(points, n_layers=n_layers(run), tokens=shown),
                    key=f"{key}-fig")
    st.dataframe(points, hide_index=True)
    downloads(points, f"massive_p{prompt_id}", key)


def sinks_view(run: Run, prompt_id: int, key: str) -> None:
    """Sink rate of the prompt and its sink tokens' lifetimes as bars."""
    from tokenprobe.analyses.sinks import sink_rate

    try:
        bars = views.sink_bars(run, prompt_id)
        views.require(run, "heads", "sink_mass", "sinks", "heads table")
    except MissingProbe as err:
        return empty_state(err)
    rate = sink_rate(run).set_index("prompt_id").loc[prompt_id]
    st.metric(f"Sink rate (eps {rate.eps:g}, k = {int(rate.k_pos)}, T = {int(rate['T'])})",
              f"{rate.sink_rate:.1f}%" if rate.nonfinite_heads == 0 else
              f"n/a: NaN/inf at {int(rate.nonfinite_heads)} heads")
    if bars.empty:
        st.info("No sink tokens found in this prompt.")
        return
    st.plotly_chart(figures.sink_lifetimes_figure(bars, n_layers=n_layers(run)),
                    key=f"{key}-fig")
    downloads(bars, f"sinks_p{prompt_id}", key)


def critical_view(run: Run, prompt_id: int, key: str) -> None:
    """Success rate per prefix with the critical token marked, and the prompt's rollouts."""
    try:
        prefixes = views.critical_prefixes(run, prompt_id)
    except MissingProbe as err:
        return empty_state(err)
    summary = views.critical_summary(run, prompt_id)
    if len(summary):
        st.dataframe(summary, hide_index=True)
    st.plotly_chart(figures.critical_figure(prefixes), key=f"{key}-fig")
    marked = prefixes[prefixes.critical]
    st.write("Critical token: " + (", ".join(f"{plain(s)} at pos {p}" for s, p in
                                              zip(marked.shown, marked.pos)) or "none"))
    downloads(prefixes, f"critical_p{prompt_id}", key)
    try:
        views.rollouts(run, prompt_id)
    except MissingProbe as err:
        return empty_state(err)
    st.subheader("Rollouts")
    scored = list(prefixes.pos[prefixes.critical_success.notna()])
    start = scored.index(marked.pos.iloc[0]) if len(marked) and marked.pos.iloc[0] in scored else 0
    shown = prefixes.set_index("pos").shown
    pos = st.selectbox("Prefix ending at position", scored, index=start, key=f"{key}-pos",
                       format_func=lambda p: f"{p}: {shown[p]}") if scored else None
    table = views.rollouts(run, prompt_id, pos)
    st.dataframe(table, hide_index=True)
    downloads(table, f"rollouts_p{prompt_id}", f"{key}-rollouts")


def spans_view(run: Run, prompt_id: int, key: str) -> None:
    """A spans run (`tokenprobe spans`): the prompt's text coloured per span by each model's
    surprisal and by their difference, inexact spans outlined, the surprisal scatter, the
    spans where the models disagree most, and the run's summary."""
    from tokenprobe.analyses import spans_views

    try:
        frame = spans_views.prompt_spans(run, prompt_id)
    except MissingProbe as err:
        return empty_state(err)
    names = spans_views.model_names(run)
    st.caption(f"A = {plain(names[0])}, B = {plain(names[1])}; whole run: " + plain(
        spans_views.summary_line(spans_views.run_summary(run)).strip()))
    for column in spans_views.colourings(frame):
        st.html(spans_views.span_html(frame, column, names=names))
    st.plotly_chart(spans_views.surprisal_scatter(frame, names), key=f"{key}-fig")
    st.subheader("Most disagreement (spans exact for both)")
    st.dataframe(spans_views.disagreements(frame, 10), hide_index=True)
    st.dataframe(frame.drop(columns="shown"), hide_index=True)
    downloads(frame, f"spans_p{prompt_id}", key)


def span_difference_view(run_a: Run, run_b: Run, prompt_id: int, metric: str,
                         layer: int | None, key: str) -> None:
    """B - A per word (or sentence) of a prompt the two runs tokenise differently: each
    run's tokens placed in the text, their values reduced per span; inexact spans outlined."""
    from tokenprobe.analyses import span_compare

    left, right = st.columns(2)
    unit = left.selectbox("Span", ["word", "sentence"], key=f"{key}-unit")
    default = span_compare.default_aggregation(metric)
    agg = right.selectbox("Over a span's tokens", span_compare.AGGREGATIONS,
                          index=span_compare.AGGREGATIONS.index(default), key=f"{key}-agg")
    frame = span_compare.span_difference(run_a, run_b, prompt_id, metric, layer=layer,
                                         unit=unit, agg=agg)
    st.caption(f"The two runs tokenise this prompt differently, so the difference is per "
               f"{unit}: each run's tokens count for the {unit} where they start, reduced by "
               f"{agg}. {int(frame.exact.sum())} of {len(frame)} spans are exact (no token of "
               "either run straddles their edges)" + ("; the others are outlined in red."
                                                      if not frame.exact.all() else "."))
    st.html(figures.token_html(frame, f"{metric} per {unit} ({agg}): B - A", diverging=True,
                               marked=frozenset(frame.span_id[~frame.exact])))
    table = frame.drop(columns=["shown", "pos", "token_id", "is_special", "token", "raw",
                                "tip"])
    st.dataframe(table, hide_index=True)
    downloads(table, f"span_difference_p{prompt_id}", key)


def unit_attribution_view(run: Run, prompt_id: int, key: str) -> None:
    """A unit-attribution run: the target, the prompt's units coloured by a chosen method,
    the bar chart with 95% error bars, the compression curve and the table."""
    from tokenprobe.analyses import unit_views

    try:
        methods = unit_views.methods(run)
    except MissingProbe as err:
        return empty_state(err)
    item = unit_views.summary(run, prompt_id)
    st.caption(f"Target: {plain(item.get('target', '?'))} = {item.get('target_value', 0):.3f} "
               f"nats over {item.get('n_units', '?')} {plain(item.get('units', ''))} unit(s)."
               + (f" IG completeness gap {item['ig_gap']:+.4f} nats." if "ig_gap" in item
                  else "") + " Positive: the unit raises the target.")
    method = st.selectbox("Method", methods, key=f"{key}-method")
    frame = unit_views.unit_token_frame(run, prompt_id, method)
    st.html(figures.token_html(frame, unit_views.LABELS.get(method, method),
                               diverging=method != "saliency"))
    st.plotly_chart(unit_views.unit_bars(run, prompt_id, method), key=f"{key}-bars")
    try:
        st.plotly_chart(unit_views.curve_figure(run, prompt_id), key=f"{key}-curve")
    except MissingProbe as err:
        empty_state(err)
    table = unit_views.unit_rows(run, prompt_id, method).drop(columns="shown")
    st.dataframe(table, hide_index=True)
    downloads(table, f"unit_attributions_p{prompt_id}_{method}", key)


def tables_view(run: Run, key: str, whole: int = 200_000) -> None:
    """Every table of the run: its size, first rows and downloads (the whole table up to
    `whole` rows, else the rows shown), and its run.json. Reads no table whole."""
    for name in sorted(run.tables):
        data = run.dataset(name)
        rows = data.count_rows()
        with st.expander(f"{name} ({rows:,} rows x {len(data.schema.names)} columns)"):
            frame = run.tables[name] if rows <= whole else data.head(1000).to_pandas()
            st.dataframe(frame.head(1000), hide_index=True)
            if rows > whole:
                st.caption(f"The first 1,000 of {rows:,} rows; the whole table is the Parquet "
                           f"parts in {plain(name)}/ of the run (`tokenprobe query` reads them).")
            downloads(frame, name, f"{key}-{name}")
    with st.expander("run.json"):
        st.json(run.meta, expanded=False)
