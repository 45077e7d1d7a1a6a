"""Per-prompt frames for figures (token colours, heatmap grids, sink bars, critical prefixes).

Pure data shaping over a `Run`, shared by the dashboard, notebooks and reports: every function
takes a run and a prompt id and returns a tidy frame or a grid (a DataFrame indexed by layer).
A view whose probe did not run raises `MissingProbe`, whose message names the probe and the
command that adds it.
"""
from __future__ import annotations


from dataclasses import dataclass

import pandas as pd

from tokenprobe.store import Run
from tokenprobe.tables import TABLES, writer_of
from tokenprobe.tokens import display_text

CRITICAL_COMMAND = "tokenprobe critical --model {model} --task FILE --out RUN_DIR"
ATTRIBUTION_COMMAND = ("tokenprobe attribute --model {model} --prompt TEXT --target TEXT "
                       "--out RUN_DIR")
SPANS_COMMAND = ("tokenprobe spans --model {model} --vs OTHER_MODEL --prompt TEXT "
                 "--out RUN_DIR")
WRITERS = {"critical": "the critical-token search",
           "attribution": "attribution by ablation (tokenprobe attribute)",
           "spans": "the two-model span comparison (tokenprobe spans)"}


class MissingProbe(LookupError):
    """The run lacks what a view needs.

    Attributes:
        reason: what is missing and which probe writes it.
        command: the command that makes a run with it (None if no command writes it yet).
    """

    def __init__(self, what: str, probe: str, model: str = "MODEL") -> None:
        self.probe, self.command = probe, probe_command(probe, model)
        writer = WRITERS.get(probe.split()[0], f"the {probe.split()[0]} probe")
        self.reason = f"This run has no {what}: it is written by {writer}."
        super().__init__(self.reason + (f" Make a run with it: {self.command}"
                                        if self.command else ""))


def probe_command(probe: str, model: str = "MODEL") -> str | None:
    """The CLI command that writes `probe`'s columns ("entropy --lens", "critical", ...)."""
    if probe == "critical":
        return CRITICAL_COMMAND.format(model=model)
    if probe.split()[0] == "attribution":  # "attribution --compression": with its flags
        return ATTRIBUTION_COMMAND.format(model=model).replace(
            " --out", "".join(f" {f}" for f in probe.split()[1:]) + " --out")
    if probe == "spans":
        return SPANS_COMMAND.format(model=model)
    name, *flags = probe.split()
    return " ".join(["tokenprobe run --model", model, "--probes", name, *flags,
                     "--prompts PROMPTS_FILE --out RUN_DIR"])


@dataclass(frozen=True)
class Metric:
    """A per-token quantity the token view can colour by.

    Attributes:
        label: what the legend calls it (with its unit).
        table, column: where it lives; for `token_layers` it is aggregated over layers with
            `over_layers` unless one layer is chosen.
        probe: the probe (and flags) that writes it, for the empty state.
        kind: "numeric" (sequential scale) or "category" (one colour per value).
        log: colour on a log10 scale.
    """

    label: str
    table: str
    column: str
    probe: str
    kind: str = "numeric"
    over_layers: str | None = None
    log: bool = False


METRICS: dict[str, Metric] = {
    "entropy": Metric("entropy of p_pos (nats)", "tokens", "entropy", "entropy"),
    "band": Metric("entropy band", "tokens", "band", "entropy", kind="category"),
    "forking": Metric("forking token", "tokens", "forking", "entropy", kind="category"),
    "sink_received": Metric("attention received (mean over layers)", "token_layers",
                            "attn_received", "sinks", over_layers="mean"),
    "resid_norm": Metric("residual norm ||h|| (max over layers)", "token_layers", "resid_norm",
                         "activations", over_layers="max", log=True),
    "massive": Metric("largest massive |h[d]| (0: none)", "massive", "value", "activations"),
    "critical": Metric("critical_success (rollout success rate of the prefix)", "tokens",
                       "critical_success", "critical"),
    "critical_ce": Metric("cDPO contrastive score (low: critical)", "tokens", "critical_ce",
                          "entropy --compare NEGATIVE_MODEL --contrast-beta 1"),
    "jsd": Metric("JSD of the two models' next-token distributions (nats, <= ln 2)", "tokens",
                  "jsd", "entropy --compare MODEL"),
    "kl_student_teacher": Metric("KL(probed || compare model) (nats)", "tokens",
                                 "kl_student_teacher", "entropy --compare MODEL"),
    "teacher_entropy": Metric("entropy of the compare model (nats)", "tokens",
                              "teacher_entropy", "entropy --compare MODEL"),
    "tip_quadrant": Metric("TIP quadrant (entropy x JSD)", "tokens", "tip_quadrant",
                           "entropy --compare MODEL", kind="category"),
    "attribution": Metric("attribution: delta log-prob of the target when ablated (nats)",
                          "attributions", "delta_logprob", "attribution"),
}

HEAD_COLUMNS = ["sink_mass", "attn_entropy", "value_drain_sink", "value_drain_rest"]
LAYER_COLUMNS = {"resid_norm": "activations", "attn_received": "sinks",
                 "attn_received_norm": "sinks", "lens_entropy": "entropy --lens", "max_abs": "activations",
                 "cos_to_first": "activations", "lens_kl_to_final": "entropy --lens"}
CATEGORY_ORDER = {"band": ["low", "mid", "high"], "forking": ["forking", "not forking"],
                  "tip_quadrant": ["high_H_high_D", "high_H_low_D", "low_H_high_D",
                                   "low_H_low_D"]}


KEY_LIKE = ("prompt_id", "layer", "pos", "head", "token_id", "top1_id", "max_abs_dim")


def _numeric(run: Run, table: str) -> list[str]:
    """The measure columns of `run.tables[table]`: numeric, not keys or ids."""
    frame = run.tables.get(table)
    if frame is None:
        return []
    return [c for c in frame.columns if c not in KEY_LIKE
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def metric_spec(name: str) -> Metric:
    """The token metric `name`: one of `METRICS`, or any other numeric column of `tokens`
    (e.g. one a new probe declares), labelled with its declared description."""
    if name in METRICS:
        return METRICS[name]
    declared = TABLES.get("tokens")
    doc = declared.columns[name].doc if declared and name in declared.columns else ""
    return Metric(doc or name, "tokens", name,
                  writer_of("tokens", name) or "the probe that writes it")


def layer_columns(run: Run) -> list[str]:
    """Layer x position measures to offer: `LAYER_COLUMNS`, then any other numeric
    `token_layers` column the run holds."""
    return list(LAYER_COLUMNS) + [c for c in _numeric(run, "token_layers")
                                  if c not in LAYER_COLUMNS]


def head_columns(run: Run) -> list[str]:
    """Layer x head measures to offer: `HEAD_COLUMNS`, then any other numeric `heads` column."""
    return HEAD_COLUMNS + [c for c in _numeric(run, "heads") if c not in HEAD_COLUMNS]


def model_of(run: Run) -> str:
    return str(run.meta.get("model", "MODEL"))


def run_warnings(run: Run) -> list[str]:
    """The warnings in the run's run.json (e.g. NaN or inf from a float16 overflow), as
    readable single-line text; anything that is not a list of strings is ignored."""
    found = run.meta.get("warnings")
    if not isinstance(found, list):
        return []
    return [display_text(w) for w in found if isinstance(w, str)]


def run_diagnostics(run: Run) -> list[tuple[str, str]]:
    """(probe, sentence) for each of run.json's `diagnostics` (per probe, the sentences saying
    where a measure means little), as readable single-line text; anything that is not a dict
    of lists of strings is ignored."""
    found = run.meta.get("diagnostics")
    if not isinstance(found, dict):
        return []
    return [(display_text(str(probe)), display_text(s)) for probe, sentences in found.items()
            if isinstance(sentences, list) for s in sentences if isinstance(s, str)]


def require(run: Run, table: str, column: str | None, probe: str, what: str) -> pd.DataFrame:
    """`run.tables[table]`, or MissingProbe if it (or its `column`) is absent."""
    frame = run.tables.get(table)
    if frame is None or (column is not None and column not in frame.columns):
        raise MissingProbe(what, probe, model_of(run))
    return frame


VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}


def readable_token(token: str, is_special: bool = False) -> str:
    """A token's exact text with whitespace made visible: space as ·, newline ↵, tab ⇥, CR ␍,
    other control characters escaped (`display_text`: ESC as \\x1b); a special token stays as
    written (e.g. `<bos>`) and an empty token is shown as ∅."""
    if is_special or token == "":
        return display_text(token) or "∅"
    for char, sign in VISIBLE.items():
        token = token.replace(char, sign)
    return display_text(token)


def text_boxes(frame: pd.DataFrame, ids: str) -> pd.DataFrame:
    """`frame` with the columns `figures.token_html` reads, for boxes that are stretches of
    text (words, prompt units) rather than tokens: pos = the `ids` column, token_id -1, not
    special, token and shown = `text` with whitespace visible, raw = `text`."""
    shown = [readable_token(t) for t in frame.text]
    return frame.assign(pos=frame[ids], token_id=-1, is_special=False, token=shown, shown=shown,
                        raw=frame.text)


def prompt_tokens(run: Run, prompt_id: int) -> pd.DataFrame:
    """The prompt's tokens: pos, token_id, token (readable), raw (exact text), is_special,
    shown (whitespace made visible)."""
    tokens = run.tokens[run.tokens.prompt_id == prompt_id]
    out = tokens[["pos", "token_id", "token", "is_special"]].reset_index(drop=True)
    # runs written before token_raw existed stored the exact text in `token`
    out["raw"] = (tokens.token_raw if "token_raw" in tokens else tokens.token).to_numpy()
    out["shown"] = [readable_token(t, s) for t, s in zip(out.raw, out.is_special)]
    return out


def token_metric_frame(run: Run, prompt_id: int, metric: str, *,
                       layer: int | None = None) -> pd.DataFrame:
    """One row per token of the prompt with `value`, the chosen metric.

    Layer metrics take `layer` if given, else their aggregate over layers; `massive` is the
    largest |value| of the token's massive entries (0 where it has none); `forking` is the
    category "forking" / "not forking" (NA at pos 0); `attribution` reads the `attributions`
    table (analyses/attribution.py), removal if it holds it, else its first knockout layer
    set (NA for positions not ablated). Columns: pos, token_id, token, is_special, shown,
    value.
    """
    spec = metric_spec(metric)
    out = prompt_tokens(run, prompt_id)
    frame = require(run, spec.table, spec.column, spec.probe, f"{spec.column} ({metric})")
    rows = frame[frame.prompt_id == prompt_id]
    if spec.table == "tokens":
        values = rows.set_index("pos")[spec.column]
        if metric == "forking":
            values = values.map({True: "forking", False: "not forking"}, na_action="ignore")
    elif spec.table == "token_layers":
        if layer is not None:
            values = rows[rows.layer == layer].set_index("pos")[spec.column]
        else:
            values = rows.groupby("pos")[spec.column].agg(spec.over_layers)
    elif spec.table == "attributions":  # removal if present, else the first knockout set
        methods = rows[["method", "layer_range"]].drop_duplicates().sort_values(
            "method", key=lambda m: m != "removal", kind="stable")
        if len(methods):
            method, layers = methods.iloc[0]
            rows = rows[(rows.method == method) & (rows.layer_range == layers)]
        values = rows.set_index("pos")[spec.column]
    else:  # massive: largest |value| per position
        values = rows.assign(v=rows.value.abs()).groupby("pos").v.max()
        values = values.reindex(out.pos).fillna(0.0)
    out["value"] = values.reindex(out.pos).to_numpy()
    tokens = run.tables.get("tokens")
    if tokens is not None and "alternatives" in tokens.columns:  # the model's top-k, on hover
        mine = tokens[tokens.prompt_id == prompt_id].set_index("pos").alternatives
        out["alternatives"] = mine.reindex(out.pos).to_numpy()
    return out


def missing_metrics(run: Run) -> dict[str, str]:
    """The featured metrics this run lacks, each with the command that makes a run with it."""
    have, model = set(available_metrics(run)), str(run.meta.get("model") or "MODEL")
    return {m: probe_command(spec.probe, model) or spec.probe
            for m, spec in METRICS.items() if m not in have}


def available_metrics(run: Run) -> list[str]:
    """The metrics this run can colour by: those of `METRICS` it has, in that order, then
    every other numeric column of its `tokens` table."""
    featured = [m for m, s in METRICS.items()
                if s.table in run.tables and s.column in run.tables[s.table].columns]
    columns = {s.column for s in METRICS.values() if s.table == "tokens"}
    return featured + [c for c in _numeric(run, "tokens") if c not in columns]


def head_grid(run: Run, prompt_id: int, column: str = "sink_mass") -> pd.DataFrame:
    """Layer x head grid of a `heads` column (index layer, columns head)."""
    heads = require(run, "heads", column, writer_of("heads", column) or "sinks", "heads table")
    rows = heads[heads.prompt_id == prompt_id]
    return rows.pivot(index="layer", columns="head", values=column).sort_index()


def layer_grid(run: Run, prompt_id: int, column: str = "resid_norm") -> pd.DataFrame:
    """Layer x position grid of a `token_layers` column (index layer, columns pos)."""
    probe = LAYER_COLUMNS.get(column) or writer_of("token_layers", column) or "activations"
    frame = require(run, "token_layers", column, probe, f"token_layers.{column}")
    rows = frame[frame.prompt_id == prompt_id]
    return rows.pivot(index="layer", columns="pos", values=column).sort_index()


def massive_points(run: Run, prompt_id: int) -> pd.DataFrame:
    """The prompt's massive activations with their token: layer, pos, dim, value, abs_value,
    ratio_to_median, token."""
    massive = require(run, "massive", None, "activations", "massive table")
    rows = massive[massive.prompt_id == prompt_id].drop(columns="prompt_id")
    shown = prompt_tokens(run, prompt_id).set_index("pos").shown
    return rows.assign(abs_value=rows.value.abs(),
                       token=rows.pos.map(shown)).reset_index(drop=True)


def sink_bars(run: Run, prompt_id: int) -> pd.DataFrame:
    """Sink tokens as bars over layers: pos, token, kind, creation_layer, lifetime, max_cos,
    last_layer and label ("token@pos"), ordered by creation layer."""
    sinks = require(run, "sinks", None, "sinks", "sinks table")
    rows = sinks[sinks.prompt_id == prompt_id].drop(columns="prompt_id")
    shown = prompt_tokens(run, prompt_id).set_index("pos").shown
    rows = rows.assign(last_layer=rows.creation_layer + rows.lifetime - 1,
                       label=[f"{shown[p]}@{p}" for p in rows.pos])
    return rows.sort_values(["creation_layer", "pos"], ignore_index=True)


def critical_prefixes(run: Run, prompt_id: int) -> pd.DataFrame:
    """Rollout success rate per prefix: pos, token, shown, critical_success, critical."""
    tokens = require(run, "tokens", "critical_success", "critical", "critical-token columns")
    rows = tokens[tokens.prompt_id == prompt_id]
    out = prompt_tokens(run, prompt_id).merge(
        rows[["pos", "critical_success"]], on="pos", how="left")
    critical = (rows.set_index("pos").critical.reindex(out.pos) if "critical" in rows
                else pd.Series(False, index=out.pos))
    out["critical"] = critical.fillna(False).astype(bool).to_numpy()
    return out


def critical_summary(run: Run, prompt_id: int) -> pd.DataFrame:
    """The prompt's row of the critical-token search summary (run.json `summary.critical`:
    task, status, critical position and token, success before / at it, counterfactual);
    empty if the run has none."""
    items = run.meta.get("summary", {}).get("critical", [])
    return pd.DataFrame([i for i in items if i.get("prompt_id") == prompt_id])


def rollouts(run: Run, prompt_id: int, pos: int | None = None) -> pd.DataFrame:
    """The prompt's rows of the `rollouts` table, only those at `pos` if given."""
    table = require(run, "rollouts", None, "critical", "rollouts table")
    rows = table[table.prompt_id == prompt_id]
    if pos is not None:
        rows = rows[rows.pos == pos]
    return rows.reset_index(drop=True)


def grid_difference(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """b - a for two grids of the same shape; ValueError naming both shapes otherwise."""
    if a.shape != b.shape or not (a.index.equals(b.index) and a.columns.equals(b.columns)):
        raise ValueError(f"the grids differ ({a.shape[0]} x {a.shape[1]} vs {b.shape[0]} x "
                         f"{b.shape[1]}): a difference needs the same layers and "
                         "heads/positions; compare them side by side")
    return b - a


def same_tokens(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Two `token_metric_frame`s hold the same token ids in the same order."""
    return a.token_id.reset_index(drop=True).equals(b.token_id.reset_index(drop=True))


def token_difference(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per-token b - a of two numeric `token_metric_frame`s over the same tokens."""
    if not same_tokens(a, b):
        raise ValueError("the two runs tokenise this prompt differently: a per-token "
                         "difference needs the same tokenizer (analyses.span_compare "
                         "compares them per word)")
    return a.assign(value=b.value.to_numpy() - a.value.to_numpy())


def prompt_comparison(a: Run, b: Run) -> pd.DataFrame:
    """Prompt-level measures of two runs side by side with their difference (b - a).

    One row per prompt id present in both: same_text, then `<measure>_a`, `<measure>_b`,
    `<measure>_diff` for n_tokens, mean_entropy, perplexity and sink_rate (those both runs have).
    """
    from tokenprobe.analyses.sinks import sink_rate

    def measures(run: Run) -> pd.DataFrame:
        frame = run.prompts.set_index("prompt_id")
        if "heads" in run.tables:
            frame = frame.join(sink_rate(run).set_index("prompt_id").sink_rate)
        return frame

    fa, fb = measures(a), measures(b)
    ids = fa.index.intersection(fb.index)
    out = pd.DataFrame({"prompt_id": ids,
                        "same_text": (fa.text.reindex(ids) == fb.text.reindex(ids)).to_numpy()})
    for col in ["n_tokens", "mean_entropy", "perplexity", "sink_rate"]:
        if col in fa and col in fb:
            va, vb = fa[col].reindex(ids).to_numpy(), fb[col].reindex(ids).to_numpy()
            out[f"{col}_a"], out[f"{col}_b"], out[f"{col}_diff"] = va, vb, vb - va
    return out
