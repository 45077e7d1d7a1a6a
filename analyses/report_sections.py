"""The sections of a report, built from one run at a time: the run's model, prompts and
per-probe summaries, each first prompt's token view and figures, span comparisons, two-model
measures, replication cards, and the sink rate against T. `report` assembles and writes them.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

from tokenprobe.analyses import two_model_views, views
from tokenprobe.analyses.replication import replication_cards
from tokenprobe.store import Run

TOKEN_METRICS = ("entropy", "sink_received", "resid_norm")  # token view: first the run has


@dataclass
class Section:
    """Part of a report: HTML blocks in order, with the figures and tables they show.

    `blocks` holds ("html", text), ("figure", name) or ("table", name) items; `figures` and
    `tables` map names (unique in the report) to a figure or to (frame, caption).
    """

    title: str
    anchor: str
    blocks: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, go.Figure] = field(default_factory=dict)
    tables: dict[str, tuple[pd.DataFrame, str]] = field(default_factory=dict)

    def text(self, markup: str) -> None:
        self.blocks.append(("html", markup))

    def figure(self, name: str, fig: go.Figure) -> None:
        self.figures[name] = fig
        self.blocks.append(("figure", name))

    def table(self, name: str, frame: pd.DataFrame, caption: str) -> None:
        self.tables[name] = (frame.reset_index(drop=True), caption)
        self.blocks.append(("table", name))


def _prompt_table(run: Run) -> pd.DataFrame:
    cols = [c for c in ["prompt_id", "n_tokens", "mean_entropy", "mean_self_certainty",
                        "perplexity", "forking_share"] if c in run.prompts]
    out = run.prompts[cols].copy()
    out.insert(2, "text", [t if len(t) <= 70 else t[:67] + "..." for t in run.prompts.text])
    return out


def run_section(index: int, label: str, run: Run, *, curve: pd.DataFrame | None = None,
                max_prompts: int = 2) -> Section:
    """A run's section: model, prompts, per-probe summaries, figures of its first prompts,
    token views and replication cards."""
    from tokenprobe.analyses import figures
    from tokenprobe.analyses.massive import massive_summary
    from tokenprobe.analyses.sinks import sink_rate

    model, p = views.model_of(run), f"r{index}"
    n_layers = int(run.meta.get("n_layers", 0))
    sec = Section(f"{label}: {model}", f"run-{index}")
    probes = ", ".join(pr.get("name", "?") for pr in run.meta.get("probes", [])) or "none recorded"
    sec.text(f"<p>Model <b>{html.escape(model)}</b> ({n_layers} blocks), "
             f"{len(run.prompts)} prompt(s), probes: {html.escape(probes)}, created "
             f"{html.escape(str(run.meta.get('created', '?')))}.</p>")
    for warning in views.run_warnings(run):  # e.g. NaN / inf from a float16 overflow
        sec.text(f'<p class="warning"><b>Warning:</b> {html.escape(warning)}</p>')
    diagnostics = views.run_diagnostics(run)  # measures that mean little in this run
    if diagnostics:
        sec.text('<div class="diagnostics"><h3>Diagnostics</h3><ul>' + "".join(
            f"<li><b>{html.escape(probe)}</b>: {html.escape(sentence)}</li>"
            for probe, sentence in diagnostics) + "</ul></div>")
    sec.table(f"{p}_prompts", _prompt_table(run), f"Prompts of {label} ({model})")
    if "massive" in run.tables:
        sec.table(f"{p}_massive", massive_summary(run),
                  f"Massive activations per prompt, {model} (Sun et al. criterion)")
    if "heads" in run.tables:
        sec.table(f"{p}_sink_rate", sink_rate(run), f"Sink rate per prompt, {model} (Gu et al.)")
    if run.meta.get("summary", {}).get("critical"):
        from tokenprobe.analyses.critical import summary_frame
        sec.table(f"{p}_critical", summary_frame(run), f"Critical tokens, {model} (Lin et al.)")
    if "spans" in run.tables:
        _spans_views(sec, run, p, max_prompts)
    if "jsd" in run.tables.get("tokens", pd.DataFrame()).columns:
        _two_model_views(sec, run, p, max_prompts)
    if "unit_attributions" in run.tables:
        _unit_views(sec, run, p, max_prompts)
    for pid in run.prompts.prompt_id[:max_prompts]:
        _prompt_views(sec, run, int(pid), f"{p}_p{pid}", n_layers, figures)
    for card in replication_cards(run, curve=curve):
        sec.text(f"<h3>Replication: {html.escape(card.measure.replace('_', ' '))}</h3><p>"
                 f"{html.escape(card.paper)}. Paper setting: {html.escape(card.setting)}. "
                 f"Ours: {html.escape(card.ours_setting)}. {html.escape(card.note)} "
                 f"Definition: docs/methods.md#{html.escape(card.measure)}</p>")
        sec.table(f"{p}_card_{card.measure}", card.frame(),
                  f"{card.measure.replace('_', ' ')}: paper vs ours ({model})")
    return sec


def _prompt_views(sec: Section, run: Run, pid: int, name: str, n_layers: int, figures) -> None:
    """Token view and figures of one prompt (each only if the run has what it needs)."""
    sec.text(f"<h3>Prompt {pid}</h3>")
    metric = next((m for m in TOKEN_METRICS if m in views.available_metrics(run)), None)
    if metric is not None:
        spec = views.METRICS[metric]
        frame = views.token_metric_frame(run, pid, metric)
        sec.text(figures.token_html(frame, spec.label, kind=spec.kind, log=spec.log))
    if "heads" in run.tables:
        sec.figure(f"{name}_sink_mass", figures.heatmap(
            views.head_grid(run, pid, "sink_mass"), title=f"sink_mass, prompt {pid}",
            x_title="head", value="sink_mass"))
    if "token_layers" in run.tables and "resid_norm" in run.token_layers:
        tokens = views.prompt_tokens(run, pid).shown.tolist()
        sec.figure(f"{name}_resid_norm", figures.heatmap(
            views.layer_grid(run, pid, "resid_norm"), title=f"resid_norm, prompt {pid}",
            x_title="position", value="||h||", log=True,
            x_labels=tokens if len(tokens) <= 60 else None))
    if "massive" in run.tables:
        points = views.massive_points(run, pid)
        if len(points):
            sec.figure(f"{name}_massive", figures.massive_figure(
                points, n_layers=n_layers, tokens=views.prompt_tokens(run, pid).shown.tolist()))
    if "sinks" in run.tables:
        bars = views.sink_bars(run, pid)
        if len(bars):
            sec.figure(f"{name}_sinks", figures.sink_lifetimes_figure(bars, n_layers=n_layers))
    if "critical_success" in run.tokens:
        prefixes = views.critical_prefixes(run, pid)
        if prefixes.critical_success.notna().any():
            sec.figure(f"{name}_critical", figures.critical_figure(prefixes))


def _spans_views(sec: Section, run: Run, p: str, max_prompts: int) -> None:
    """A spans run (`tokenprobe spans`): the summary, the spans where the models disagree
    most, the surprisal scatter and the first prompts' text coloured by the difference."""
    from tokenprobe.analyses import spans_views

    a, b = names = spans_views.model_names(run)
    sec.text(f"<h3>Span comparison: {html.escape(a)} (A) vs {html.escape(b)} (B)</h3><p>"
             "Surprisal -log p(span | prefix) in nats per character span; a span is exact when "
             "both tokenisations have a boundary at its edges (else a straddling token counts "
             "where it starts).</p>")
    sec.table(f"{p}_spans_summary", spans_views.summary_frame(run),
              f"Span comparison, {a} vs {b}: share exact, mean |B - A| and correlation over "
              "exact spans")
    sec.table(f"{p}_spans_disagree", spans_views.disagreements(run.spans, 10),
              f"Spans where {a} and {b} disagree most (exact for both; nats)")
    sec.figure(f"{p}_spans_scatter", spans_views.surprisal_scatter(run.spans, names))
    for pid in run.prompts.prompt_id[:max_prompts]:
        frame = spans_views.prompt_spans(run, int(pid))
        sec.text(f"<p>Prompt {int(pid)}:</p>"
                 + spans_views.span_html(frame, "surprisal_diff", names=names))


def _two_model_views(sec: Section, run: Run, p: str, max_prompts: int) -> None:
    """A two-model run (`--probe entropy --compare MODEL`): per-prompt means of the two-model
    columns and TIP quadrant shares, the TIP plane, and the first prompts coloured by JSD."""
    from tokenprobe.analyses import figures

    a, b = views.model_of(run), two_model_views.compare_model(run) or "the compare model"
    sec.text(f"<h3>Two models: {html.escape(a)} (student) and {html.escape(b)} (teacher)</h3>"
             "<p>Per token: the JSD and both KL divergences of the two next-token "
             "distributions and the teacher's entropy (nats); TIP's quadrants split H / ln V "
             "and JSD / ln 2 at the thresholds recorded in run.json (docs/methods.md#tip).</p>")
    sec.table(f"{p}_two_models", two_model_views.two_model_summary(run),
              f"Two-model measures per prompt, {a} against {b} (means in nats, quadrant "
              "shares in %)")
    sec.figure(f"{p}_tip", figures.tip_figure(two_model_views.tip_points(run)))
    spec = views.METRICS["jsd"]
    for pid in run.prompts.prompt_id[:max_prompts]:
        frame = views.token_metric_frame(run, int(pid), "jsd")
        sec.text(f"<p>Prompt {int(pid)}, coloured by JSD:</p>"
                 + figures.token_html(frame, spec.label, kind=spec.kind, log=spec.log))


def _unit_views(sec: Section, run: Run, p: str, max_prompts: int) -> None:
    """A unit-attribution run (`tokenprobe attribute --method shapley ...`): the targets,
    then per first prompt every method's value per unit, the units coloured and as bars (95%
    error bars where sampled) by the first of Shapley / IG / ..., and the compression curve."""
    from tokenprobe.analyses import figures, unit_views
    from tokenprobe.analyses.unit_attribution import RANK_ORDER

    model, methods = views.model_of(run), unit_views.methods(run)
    shown = next(m for m in RANK_ORDER if m in methods)
    sec.text("<h3>Attribution to prompt units</h3><p>Each method's value per unit, positive "
             "when the unit raises the target (saliency: a gradient norm); definitions in "
             "docs/methods.md#unit-attribution.</p>")
    sec.table(f"{p}_unit_targets", unit_views.targets_frame(run),
              f"Attribution targets per prompt, {model} (values in nats)")
    for pid in run.prompts.prompt_id[:max_prompts]:
        pid = int(pid)
        rows = run.unit_attributions[run.unit_attributions.prompt_id == pid]
        wide = rows.pivot(index=["unit_id", "text"], columns="method", values="value")
        sec.table(f"{p}_p{pid}_units", wide[[m for m in methods]].reset_index(),
                  f"Unit attributions of prompt {pid} by method, {model}")
        frame = unit_views.unit_token_frame(run, pid, shown)
        sec.text(f"<p>Prompt {pid}, units coloured by {html.escape(shown)}:</p>"
                 + figures.token_html(frame, unit_views.LABELS[shown],
                                      diverging=shown != "saliency"))
        sec.figure(f"{p}_p{pid}_attribution", unit_views.unit_bars(run, pid, shown))
        if "attribution_curves" in run.tables:
            sec.figure(f"{p}_p{pid}_compression", unit_views.curve_figure(run, pid))


def curve_section(curve: pd.DataFrame) -> Section:
    """The sink rate against T: the table and its figure."""
    from tokenprobe.analyses import figures

    sec = Section("Sink rate against T", "sink-curve")
    sec.text("<p>Gu et al.'s Sink_1^eps at each T; a text shorter than T is not padded, so "
             "T_reached_min / T_reached_max give the lengths actually measured.</p>")
    sec.table("sink_rate_curve", curve, "Sink rate (%) against T")
    sec.figure("sink_rate_curve", figures.sink_rate_curve_figure(curve))
    return sec
