"""The tokenprobe dashboard (Streamlit script): pick a run or make one live, view a prompt's
tokens and heatmaps, compare two runs. Start it with `tokenprobe app [RUNS_ROOT]`.

Thin by design: runs come from `tokenprobe.app.runs`, frames from `tokenprobe.analyses.views`,
figures from `tokenprobe.analyses.figures`, laid out by `tokenprobe.app.panels`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

import tokenprobe
from tokenprobe.analyses import figures, head_pattern, views
from tokenprobe.app import panels, runs
from tokenprobe.app.panels import plain
from tokenprobe.probe import Probe, registry
from tokenprobe.store import RUN_JSON, Run, RunNotFoundError

PAGES = ["Run", "Compare", "Live run"]
TABS = ["Tokens", "Heads", "Layers", "Massive", "Sinks", "Critical", "Tables"]
LIVE_MODELS = ["smollm2-135m", "gemma3-270m", "tiny-llama", "tiny-gemma3"]
QUERY = {"run": "run", "cmpA": "a", "cmpB": "b"}  # URL parameters naming the runs shown


@st.cache_resource(show_spinner=False, max_entries=16)
def load_run(path: str, stamp: float) -> Run:
    """A run (its run.json; tables are read when a view asks), kept per directory and
    run.json modification time."""
    return tokenprobe.open_run(path)


@st.cache_resource(show_spinner="Loading the model...")
def load_model(name: str) -> tokenprobe.LoadedModel:
    return tokenprobe.load(name)


@st.cache_data(show_spinner="Computing the head's attention pattern...", max_entries=64)
def head_pattern_of(model: str, ids: tuple[int, ...], layer: int, head: int) -> np.ndarray:
    """One head's (T, T) attention pattern on a prompt, for display only (never stored)."""
    return head_pattern.head_pattern(load_model(model), list(ids), layer, head)


def open_named(root: Path, name: str) -> Run | None:
    """The run `name` inside `root`, or None after showing why it cannot be opened (outside
    the root, unfinished, or a run.json naming unsafe table files)."""
    try:
        path = runs.resolve_run(root, name)
        return load_run(str(path), (path / RUN_JSON).stat().st_mtime)
    except (runs.RunPathError, RunNotFoundError) as err:
        st.error(str(err))
        return None


def pick_run(root: Path, label: str, key: str, index: int = 0) -> tuple[str, Run] | None:
    """A run chosen from those under the root or typed as a path inside it (default: the URL's
    `?run=` on the Run page, `?a=` / `?b=` on Compare)."""
    names = runs.list_runs(root)
    wanted = st.query_params.get(QUERY[key])
    typed = st.sidebar.text_input(f"{label}: or a path inside the runs root", value=(
        wanted if wanted and wanted not in names else ""), key=f"{key}-path")
    if typed:
        return (typed, run) if (run := open_named(root, typed)) else None
    if not names:
        st.info(f"No runs under {root} yet. Make one with `tokenprobe run --prompts FILE "
                f"--out {root / 'NAME'}` (or `make demo`), or use the Live run page.")
        return None
    start = names.index(wanted) if wanted in names else min(index, len(names) - 1)
    name = st.sidebar.selectbox(label, names, index=start, key=f"{key}-name")
    return (name, run) if (run := open_named(root, name)) else None


def pick_prompt(run: Run, key: str) -> int:
    prompts = run.prompts.set_index("prompt_id")
    return st.selectbox("Prompt", list(prompts.index), key=f"{key}-prompt", format_func=lambda
                        i: f"[{i}] {prompts.text[i][:80]!r} ({prompts.n_tokens[i]} tokens)")


def run_header(name: str, run: Run) -> None:
    meta = run.meta
    parts = [f"**{plain(name)}**: model {plain(meta.get('model', '?'))}"
             + (f" ({plain(meta['n_layers'])} layers)" if meta.get("n_layers") else "")]
    if isinstance(meta.get("probes"), list):
        parts.append("probes: " + ", ".join(plain(p.get("name", "?")) for p in meta["probes"]
                                            if isinstance(p, dict)))
    if meta.get("analysis"):
        parts.append(f"analysis: {plain(meta['analysis'])}")
    parts += [f"{run.meta.get('n_prompts') or run.dataset('prompts').count_rows()} prompt(s)",
              f"created {plain(meta.get('created', '?'))}",
              f"tables: {plain(', '.join(sorted(run.tables)))}"]
    st.caption("; ".join(parts))
    for warning in views.run_warnings(run):  # e.g. NaN / inf from a float16 overflow
        st.warning(plain(warning))
    for probe, sentence in views.run_diagnostics(run):  # measures that mean less here
        st.info(f"{plain(probe)}: {plain(sentence)}")


def show_run(name: str, run: Run, key: str) -> None:
    """Every view of one prompt of `run`, one tab each; the prompt's views read only its rows
    (`Run.select`)."""
    run_header(name, run)
    prompt_id = pick_prompt(run, key)
    whole, run = run, run.select([prompt_id])
    names = ((["Spans"] if "spans" in run.tables else [])  # a two-model span run
             + (["Attribution"] if "unit_attributions" in run.tables else []) + TABS)
    tabs = dict(zip(names, st.tabs(names)))
    if "Attribution" in tabs:
        with tabs["Attribution"]:
            panels.unit_attribution_view(run, prompt_id, f"{key}-units")
    if "Spans" in tabs:
        with tabs["Spans"]:
            panels.spans_view(run, prompt_id, f"{key}-spans")
    with tabs["Tokens"]:
        metric, layer = panels.token_metric_picker(run, key)
        panels.token_view(run, prompt_id, metric, layer, f"{key}-tokens")
        panels.tip_view(run, f"{key}-tokens")
    with tabs["Heads"]:
        column = st.selectbox("Head measure", views.head_columns(run), key=f"{key}-headcol")
        panels.heads_view(run, prompt_id, column, f"{key}-heads")
        panels.head_pattern_view(run, prompt_id, f"{key}-pattern", load=load_model,
                                 pattern=head_pattern_of)
    with tabs["Layers"]:
        column = st.selectbox("Layer x position measure", views.layer_columns(run),
                              key=f"{key}-layercol")
        panels.layers_view(run, prompt_id, column, f"{key}-layers")
    with tabs["Massive"]:
        panels.massive_view(run, prompt_id, f"{key}-massive")
    with tabs["Sinks"]:
        panels.sinks_view(run, prompt_id, f"{key}-sinks")
    with tabs["Critical"]:
        panels.critical_view(run, prompt_id, f"{key}-critical")
    with tabs["Tables"]:
        panels.tables_view(whole, f"{key}-tables")


def page_run(root: Path) -> None:
    st.header("Run")
    if picked := pick_run(root, "Run", "run"):
        show_run(*picked, key="run")


def page_compare(root: Path) -> None:
    st.header("Compare two runs")
    a, b = pick_run(root, "Run A", "cmpA", 0), pick_run(root, "Run B", "cmpB", 1)
    if not (a and b):
        return
    (name_a, run_a), (name_b, run_b) = a, b
    prompt_id = pick_prompt(run_a, "cmp")
    if prompt_id not in set(run_b.prompts.prompt_id):
        st.warning(f"Run B has no prompt {prompt_id}.")
        return
    kind = st.radio("View", ["Tokens", "Heads", "Layers"], horizontal=True, key="cmp-kind")
    if kind == "Tokens":
        metric, layer = panels.token_metric_picker(run_a, "cmp")
    else:
        options = (views.head_columns(run_a) if kind == "Heads" else
                   views.layer_columns(run_a))
        column = st.selectbox("Measure", options, key=f"cmp-{kind}")
    for (name, run, side), col in zip([(name_a, run_a, "A"), (name_b, run_b, "B")],
                                      st.columns(2)):
        with col:
            st.subheader(f"{side}: {name}")
            run_header(name, run)
            if kind == "Tokens":
                panels.token_view(run, prompt_id, metric, layer, f"cmp{side}-tokens")
            elif kind == "Heads":
                panels.heads_view(run, prompt_id, column, f"cmp{side}-heads")
            else:
                panels.layers_view(run, prompt_id, column, f"cmp{side}-layers")
    st.subheader("Difference (B - A)")
    try:
        if kind == "Tokens":
            spec = views.metric_spec(metric)
            if spec.kind != "numeric":
                raise ValueError(f"{metric} is a category; pick a numeric metric for a difference")
            fa, fb = (views.token_metric_frame(r, prompt_id, metric, layer=layer)
                      for r in (run_a, run_b))
            if views.same_tokens(fa, fb):
                st.html(figures.token_html(views.token_difference(fa, fb), f"{metric}: B - A",
                                           diverging=True))
            else:
                panels.span_difference_view(run_a, run_b, prompt_id, metric, layer, "cmp-span")
        else:
            grid = views.head_grid if kind == "Heads" else views.layer_grid
            diff_grid = views.grid_difference(grid(run_a, prompt_id, column),
                                              grid(run_b, prompt_id, column))
            st.plotly_chart(figures.heatmap(diff_grid, title=f"{column}: B - A", value="B - A",
                                            x_title="head" if kind == "Heads" else "position",
                                            diverging=True), key="cmp-diff-fig")
            panels.downloads(runs.grid_table(diff_grid, f"{column}_diff"), "difference",
                             "cmp-diff")
    except views.MissingProbe as err:
        panels.empty_state(err)
    except ValueError as err:
        st.warning(str(err))
    st.subheader("Per prompt")
    table = views.prompt_comparison(run_a, run_b)
    st.dataframe(table, hide_index=True)
    panels.downloads(table, "prompt_comparison", "cmp-prompts")


def page_live(root: Path) -> None:
    st.header("Live run")
    st.write(f"Runs a prompt through an embedded model and saves the result under {root}.")
    known = registry()
    probes = st.multiselect("Probes", list(known), default=list(known), key="form-probes")
    with st.form("live"):
        prompt = st.text_area("Prompt", key="form-prompt")
        model = st.selectbox("Model", LIVE_MODELS, key="form-model")
        options = {name: probe_controls(known[name]) for name in probes}
        name = st.text_input("Run name (default: live-<time>)", key="form-name")
        submitted = st.form_submit_button("Run")
    if submitted:
        make_live_run(root, prompt, model, options, name.strip() or None)
    if done := st.session_state.get("live-run"):
        if picked := open_named(root, done):
            show_run(done, picked, key="live")


def probe_controls(probe: type[Probe]) -> dict:
    """A control for every option of `probe` (its Config fields), in an expander; returns
    the values that differ from the defaults."""
    values = {}
    with st.expander(f"{probe.name} options"):
        for option in probe.options():
            if option.type == "model":  # a second model: the CLI's, not the live page's
                continue
            key, label = f"form-{probe.name}-{option.name.replace('_', '-')}", option.name
            if option.type is bool:
                value = st.checkbox(label, value=option.default, help=option.help, key=key)
            elif option.choices:
                value = st.selectbox(label, option.choices, help=option.help, key=key,
                                     index=option.choices.index(option.default))
            elif option.type in (int, float) and not option.optional:
                value = st.number_input(label, value=option.default, help=option.help, key=key)
            else:  # tuples and optional numbers: typed, empty for the default
                text = st.text_input(label, help=option.help, key=key, placeholder=str(
                    ",".join(map(str, option.default)) if option.type is tuple else
                    option.default))
                value = option.parse(text) if text.strip() else option.default
            if value != option.default:
                values[option.name] = value
    return values


def make_live_run(root: Path, prompt: str, model: str, options: dict[str, dict],
                  name: str | None) -> None:
    from tokenprobe.tokens import PromptError

    if not options:
        st.error("Pick at least one probe.")
        return
    try:
        out = runs.new_run_path(root, name)
        known = registry()
        chosen = [known[probe].from_options(values) for probe, values in options.items()]
        with st.spinner(f"Running {model} on the prompt..."):
            tokenprobe.run(load_model(model), [prompt], chosen, out=out, progress=False)
    except (runs.RunPathError, PromptError, ValueError) as err:
        st.error(str(err))
        return
    st.session_state["live-run"] = out.relative_to(root.resolve()).as_posix()
    st.success(f"Saved as run {st.session_state['live-run']} under {root}.")


def main() -> None:
    st.set_page_config(page_title="tokenprobe", layout="wide")
    root = runs.runs_root()
    st.sidebar.title("tokenprobe")
    st.sidebar.caption(f"runs root: {root}")
    st.sidebar.caption("What every measure means: docs/methods.md in the tokenprobe source")
    wanted = st.query_params.get("page", "Run")
    page = st.sidebar.radio("Page", PAGES, index=PAGES.index(wanted) if wanted in PAGES else 0,
                            key="page")
    {"Run": page_run, "Compare": page_compare, "Live run": page_live}[page](root)


main()
