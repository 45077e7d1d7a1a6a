"""The dashboard: run-store access, view frames and figures on a real tiny run, and every page
and state of the Streamlit app through streamlit.testing's AppTest."""
from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamlit.testing.v1 import AppTest

import tokenprobe
from tokenprobe.analyses import figures, views
from tokenprobe.app import runs
from tokenprobe.probes import EntropyConfig, EntropyProbe
from tokenprobe.store import Run

DASHBOARD = str(Path(runs.__file__).with_name("dashboard.py"))
PROMPTS = ["The cat sat on the mat.", "Hi there\n\tfriend!"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama) -> Path:
    """A runs root: `full` (all probes, lens), `partial` (activations only), `critical` (full
    plus hand-made critical columns, rollouts and massive rows), a group, junk beside them."""
    root = tmp_path_factory.mktemp("runs")
    full = tokenprobe.run(tiny_llama, PROMPTS, ["activations", "sinks",
                                                EntropyProbe(EntropyConfig(lens=True))],
                          out=root / "full", progress=False)
    tokenprobe.run(tiny_llama, PROMPTS, ["activations"], out=root / "partial", progress=False)
    tokens = full.tokens.copy()
    success = [np.nan, 0.5, 0.25, 0.0, 0.75] + [np.nan] * (len(tokens) - 5)
    tokens["critical_success"] = success
    tokens["critical"] = pd.array([pd.NA, False, False, True, False] + [pd.NA] * (len(tokens) - 5),
                                  dtype="boolean")
    rollouts = pd.DataFrame({"prompt_id": [0, 0, 0], "pos": [3, 3, 1], "kind": "prefix",
                             "rollout": [0, 1, 0], "text": ["no", "nope", "yes"],
                             "correct": [False, False, True]})
    massive = pd.DataFrame({"prompt_id": [0, 0, 0], "layer": [1, 2, 1], "pos": [0, 0, 2],
                            "dim": [5, 5, 7], "value": [-500.0, 300.0, 200.0],
                            "ratio_to_median": [2000.0, 1500.0, 1100.0]})
    attributions = pd.DataFrame({"prompt_id": 0, "pos": [0, 1, 2, 1], "method": [
        "knockout", "removal", "removal", "knockout"], "layer_range": ["0-1", "", "", "0-1"],
        "delta_logprob": [-9.0, -1.5, 0.25, -7.0]})
    summary = {**full.meta["summary"], "critical": [{"prompt_id": 0, "status": "critical",
                                                     "critical_pos": 3, "success_at": 0.0}]}
    Run({**full.tables, "tokens": tokens, "rollouts": rollouts, "massive": massive,
         "attributions": attributions}, {**full.meta, "summary": summary}).save(root / "critical")
    (root / "group").mkdir()
    full.save(root / "group" / "inner")
    (root / ".hidden").mkdir()
    (root / "unfinished").mkdir()
    (root / "notes.txt").write_text("not a run")
    return root


@pytest.fixture(scope="module")
def full(root) -> Run:
    return tokenprobe.open_run(root / "full")


@pytest.fixture(scope="module")
def critical(root) -> Run:
    return tokenprobe.open_run(root / "critical")


# ---- run store access ----------------------------------------------------------------------

def test_list_runs_only_complete_runs_inside_the_root(root, tmp_path):
    outside = tmp_path / "elsewhere"
    tokenprobe.open_run(root / "partial").save(outside)
    link = root / "link-out"
    link.symlink_to(outside)
    try:
        assert runs.list_runs(root) == ["critical", "full", "group/inner", "partial"]
    finally:
        link.unlink()
    assert runs.list_runs(root / "missing") == []


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "full/../../x", "group/../../x"])
def test_resolve_run_refuses_paths_outside_the_root(root, name):
    with pytest.raises(runs.RunPathError, match="outside the runs root"):
        runs.resolve_run(root, name)


def test_resolve_run(root, tmp_path):
    assert runs.resolve_run(root, "full") == (root / "full").resolve()
    assert runs.resolve_run(root, "group/inner") == (root / "group" / "inner").resolve()
    with pytest.raises(runs.RunPathError, match="no run 'nothing'"):
        runs.resolve_run(root, "nothing")
    with pytest.raises(runs.RunPathError, match="not a complete tokenprobe run"):
        runs.resolve_run(root, "unfinished")
    (root / "escape").symlink_to(tmp_path)
    try:
        with pytest.raises(runs.RunPathError, match="outside"):
            runs.resolve_run(root, "escape")
    finally:
        (root / "escape").unlink()


def test_new_run_path(root):
    assert runs.new_run_path(root, "fresh") == (root / "fresh").resolve()
    assert runs.new_run_path(root).name.startswith("live-")
    for bad, message in [("../x", "letters"), ("a b", "letters"), ("full", "already exists")]:
        with pytest.raises(runs.RunPathError, match=message):
            runs.new_run_path(root, bad)


def test_frame_bytes_round_trip(full):
    frame = full.heads
    assert pd.read_csv(io.BytesIO(runs.frame_bytes(frame, "csv"))).shape == frame.shape
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(runs.frame_bytes(frame, "parquet"))),
                                  frame)
    with pytest.raises(ValueError, match="unknown format"):
        runs.frame_bytes(frame, "xlsx")


# ---- view frames ---------------------------------------------------------------------------

def test_readable_token():
    assert views.readable_token(" a\n") == "·a↵"
    assert views.readable_token("\tx\r") == "⇥x␍"
    assert views.readable_token("<s> x", is_special=True) == "<s> x"
    assert views.readable_token("") == "∅"


def test_token_metric_frame_values(full):
    tokens = full.tokens[full.tokens.prompt_id == 1]
    frame = views.token_metric_frame(full, 1, "entropy")
    assert frame.token.tolist() == tokens.token.tolist()
    assert "↵" in "".join(frame.shown) and "⇥" in "".join(frame.shown)
    np.testing.assert_array_equal(frame.value.to_numpy(dtype=float),
                                  tokens.entropy.to_numpy(dtype=float))
    layers = full.token_layers[full.token_layers.prompt_id == 1]
    by_pos = {p: g for p, g in layers.groupby("pos")}
    norm = views.token_metric_frame(full, 1, "resid_norm")
    assert norm.value.tolist() == [by_pos[p].resid_norm.max() for p in norm.pos]
    received = views.token_metric_frame(full, 1, "sink_received")
    np.testing.assert_allclose(received.value, [by_pos[p].attn_received.mean()
                                                for p in received.pos])
    at_2 = views.token_metric_frame(full, 1, "resid_norm", layer=2)
    assert at_2.value.tolist() == layers[layers.layer == 2].resid_norm.tolist()
    forking = views.token_metric_frame(full, 1, "forking").value
    assert pd.isna(forking.iloc[0]) and set(forking.dropna()) <= {"forking", "not forking"}


def test_massive_and_critical_frames(critical):
    massive = views.token_metric_frame(critical, 0, "massive")
    assert massive.value.tolist()[:4] == [500.0, 0.0, 200.0, 0.0]
    points = views.massive_points(critical, 0)
    assert points.abs_value.tolist() == [500.0, 300.0, 200.0]
    assert points.token.iloc[0] == views.prompt_tokens(critical, 0).shown[0]
    attribution = views.token_metric_frame(critical, 0, "attribution").value
    assert attribution.tolist()[1:3] == [-1.5, 0.25] and pd.isna(attribution.iloc[0])
    prefixes = views.critical_prefixes(critical, 0)
    assert prefixes.critical.tolist()[:5] == [False, False, False, True, False]
    assert prefixes.critical_success.iloc[3] == 0.0
    assert views.rollouts(critical, 0, 3).text.tolist() == ["no", "nope"]
    assert views.critical_summary(critical, 0).critical_pos.tolist() == [3]
    assert views.critical_summary(critical, 1).empty
    shown = list(views.prompt_tokens(critical, 0).shown)
    fig = figures.massive_figure(points, n_layers=3, tokens=shown)
    assert [list(t.y) for t in fig.data] == [[0, 0], [2]]  # dims 5 and 7
    assert fig.layout.yaxis.ticktext[2] == f"2:{shown[2]}"
    fig = figures.critical_figure(prefixes)
    assert list(fig.data[0].y) == [0.5, 0.25, 0.0, 0.75]  # scored prefixes only
    assert list(fig.data[1].x) == [f"3:{prefixes.shown[3]}"]
    assert len(views.rollouts(critical, 1)) == 0


def test_grids(full):
    n_layers = full.meta["n_layers"]
    grid = views.head_grid(full, 0, "sink_mass")
    heads = full.heads[full.heads.prompt_id == 0]
    assert grid.shape == (n_layers, heads["head"].nunique())
    row = heads[(heads.layer == 1) & (heads["head"] == 2)]
    assert grid.loc[1, 2] == row.sink_mass.item()
    layer = views.layer_grid(full, 0, "lens_entropy")
    assert layer.shape == (n_layers, int(full.prompts.n_tokens[0]))
    tidy = runs.grid_table(grid, "sink_mass")
    assert list(tidy.columns) == ["layer", "head", "sink_mass"] and len(tidy) == grid.size
    assert (views.grid_difference(grid, grid * 3) == grid * 2).all().all()
    with pytest.raises(ValueError, match="grids differ"):
        views.grid_difference(grid, grid.iloc[:-1])


def test_sink_bars(full):
    bars = views.sink_bars(full, 0)
    assert (bars.last_layer == bars.creation_layer + bars.lifetime - 1).all()
    assert bars.kind.iloc[0] == "primary" and bars.label.iloc[0].endswith("@0")


def test_token_difference_and_prompt_comparison(full, critical):
    a = views.token_metric_frame(full, 0, "entropy")
    b = a.assign(value=a.value * 2)
    pd.testing.assert_series_equal(views.token_difference(a, b).value, a.value)
    with pytest.raises(ValueError, match="tokenise"):
        views.token_difference(a, views.token_metric_frame(full, 1, "entropy"))
    table = views.prompt_comparison(full, critical)
    assert table.same_text.all() and (table.mean_entropy_diff == 0).all()
    assert (table.sink_rate_diff == 0).all()


def test_missing_probe_names_the_probe_and_command(root):
    partial = tokenprobe.open_run(root / "partial")
    with pytest.raises(views.MissingProbe) as err:
        views.head_grid(partial, 0)
    assert err.value.command == ("tokenprobe run --model tiny-llama --probes sinks "
                                 "--prompts PROMPTS_FILE --out RUN_DIR")
    with pytest.raises(views.MissingProbe, match="--probes entropy --lens"):
        views.layer_grid(partial, 0, "lens_entropy")
    with pytest.raises(views.MissingProbe, match="tokenprobe critical --model tiny-llama "
                                                 "--task FILE --out RUN_DIR"):
        views.critical_prefixes(partial, 0)
    with pytest.raises(views.MissingProbe) as err:
        views.token_metric_frame(partial, 0, "attribution")
    assert err.value.command == ("tokenprobe attribute --model tiny-llama --prompt TEXT "
                                 "--target TEXT --out RUN_DIR")
    assert "tokenprobe attribute" in err.value.reason
    assert views.available_metrics(partial) == ["resid_norm", "massive"]


# ---- figures -------------------------------------------------------------------------------

def test_token_html_shows_every_token_with_exact_values(full):
    frame = views.token_metric_frame(full, 1, "entropy")
    page = figures.token_html(frame, "entropy")
    assert page.count('class="tp-tok"') == len(frame)
    for value in frame.value.dropna():
        assert f"entropy: {value:.6g}" in page
    assert "<br>" in page  # the newline token breaks the line
    colours, scale = figures.token_colours(frame.value)
    assert colours[0] == figures.NO_VALUE  # NA at pos 0
    assert colours[int(frame.value.idxmax())] == "rgb(128, 0, 38)"  # YlOrRd's top
    assert scale["lo"] == frame.value.min() and scale["hi"] == frame.value.max()
    colours, scale = figures.token_colours(pd.Series(["low", "high", None]), kind="category")
    assert colours == ["#c6dbef", "#ef6548", figures.NO_VALUE]


def test_heatmap_log_scale_keeps_exact_values(full):
    grid = views.layer_grid(full, 0, "resid_norm")
    fig = figures.heatmap(grid, title="t", x_title="position", value="resid_norm", log=True,
                          x_labels=list(views.prompt_tokens(full, 0).shown))
    trace = fig.data[0]
    np.testing.assert_allclose(trace.z, np.log10(grid.to_numpy()))
    np.testing.assert_array_equal(trace.customdata, grid.to_numpy())
    assert trace.x[0].startswith("0:")


# ---- the app (AppTest) ---------------------------------------------------------------------

def app(root: Path, monkeypatch, **query) -> AppTest:
    monkeypatch.setenv(runs.ROOT_ENV, str(root))
    at = AppTest.from_file(DASHBOARD, default_timeout=60)
    at.query_params.update(query)
    return at.run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def token_text(page: str) -> str:
    """The token view's text, its spans' contents joined."""
    return html.unescape("".join(re.findall(r'class="tp-tok"[^>]*>([^<]*)</span>', page)))


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_run_page_all_views(root, monkeypatch, full):
    at = app(root, monkeypatch, run="full")
    assert not at.exception and not at.error
    assert [t.label for t in at.tabs] == ["Tokens", "Heads", "Layers", "Massive", "Sinks",
                                          "Critical", "Tables"]
    assert token_text(at.html[0].value) == "".join(views.prompt_tokens(full, 0).shown)
    assert charts(at) == 3  # heads and layers heatmaps, sink lifetimes
    assert "No massive activations" in texts(at.info)
    assert "tokenprobe critical --model tiny-llama --task FILE --out RUN_DIR" in texts(at.code)
    assert len(at.download_button) >= 2 * (3 + len(full.tables))
    offered = at.selectbox(key="run-metric").options
    assert len(offered) == len(views.available_metrics(full))  # only what the run holds
    assert not any(o.startswith(("critical:", "attribution:", "jsd:")) for o in offered)
    assert "critical (`tokenprobe critical --model tiny-llama" in texts(at.caption)
    for metric in views.available_metrics(full):
        at.selectbox(key="run-metric").set_value(metric).run()
        assert not at.exception, metric
    at.selectbox(key="run-metric").set_value("resid_norm").run()
    at.selectbox(key="run-layer").set_value(1).run()
    assert "resid_norm at layer 1" in at.html[0].value
    for column in views.HEAD_COLUMNS:
        at.selectbox(key="run-headcol").set_value(column).run()
    for column in views.LAYER_COLUMNS:
        at.selectbox(key="run-layercol").set_value(column).run()
    at.selectbox(key="run-prompt").set_value(1).run()
    assert not at.exception and not at.error and charts(at) == 3


def test_run_missing_probes_says_which_probe_and_command(root, monkeypatch):
    at = app(root, monkeypatch, run="partial")
    assert not at.exception and not at.error
    assert "residual norm" in at.html[0].value  # the first metric the run has
    info, code = texts(at.info), texts(at.code)
    assert "written by the sinks probe" in info
    assert "tokenprobe run --model tiny-llama --probes sinks --prompts PROMPTS_FILE" in code
    assert "tokenprobe critical --model tiny-llama --task FILE --out RUN_DIR" in code
    assert "entropy, band, forking (`tokenprobe run --model tiny-llama --probes entropy " \
        "--prompts" in texts(at.caption)  # not offered, and how to get it
    at.selectbox(key="run-layercol").set_value("lens_entropy").run()
    assert "--probes entropy --lens" in texts(at.code)
    assert charts(at) == 0


def test_critical_run(root, monkeypatch):
    at = app(root, monkeypatch, run="critical")
    assert not at.exception and not at.error
    assert charts(at) == 5  # + massive points and the success rate per prefix
    assert any("at pos 3" in str(m.value) for m in at.markdown)
    at.selectbox(key="run-metric").set_value("critical").run()
    assert 'data-pos="3" title="pos 3' in at.html[0].value
    assert at.html[0].value.count("2px solid #d62728") == 1  # the critical token outlined
    rollouts = [d.value for d in at.dataframe if "correct" in d.value.columns]
    assert rollouts[0].text.tolist() == ["no", "nope"]


def shown_figure(at: AppTest, title: str):
    """The plotly figure on the page whose title starts with `title`."""
    import plotly.io

    figs = [plotly.io.from_json(c.proto.spec) for c in at.get("plotly_chart")]
    return next(f for f in figs if (f.layout.title.text or "").startswith(title))


def plotly_array(value) -> np.ndarray:
    """An array of a figure read back from JSON (plotly writes numpy arrays as base64)."""
    import base64

    if not isinstance(value, dict):
        return np.asarray(value)
    flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return flat.reshape([int(n) for n in value["shape"].split(",")])


def test_head_pattern_on_demand(root, monkeypatch, full, tiny_llama):
    from tokenprobe.analyses.head_pattern import head_pattern

    at = app(root, monkeypatch, run="full")
    assert not [c for c in at.get("plotly_chart") if "query" in c.proto.spec]  # off by default
    at.toggle(key="run-pattern-on").set_value(True).run()
    assert not at.exception and not at.error
    shown = list(views.prompt_tokens(full, 0).shown)
    ids = full.tokens[full.tokens.prompt_id == 0].sort_values("pos").token_id.tolist()
    fig = shown_figure(at, "Layer 0 head 0")
    heat = fig.data[0]
    assert heat.type == "heatmap" and list(heat.x) == list(heat.y) == [
        f"{i}:{t}" for i, t in enumerate(shown)]
    np.testing.assert_allclose(plotly_array(heat.z), head_pattern(tiny_llama, ids, 0, 0))
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(-0.5, 0.5)]  # the sink column, key 0
    assert "sink" in fig.layout.annotations[0].text
    assert "Sink column outlined in red: key 0" in texts(at.caption)
    last = len(shown) - 1
    page = next(h.value for h in at.html if "attention from query" in h.value)
    assert f"attention from query {last} (outlined)" in page and token_text(page) == "".join(shown)
    at.selectbox(key="run-pattern-layer").set_value(2).run()
    at.selectbox(key="run-pattern-head").set_value(3).run()
    at.selectbox(key="run-pattern-query").set_value(3).run()
    assert not at.exception and not at.error
    weights = head_pattern(tiny_llama, ids, 2, 3)
    np.testing.assert_allclose(plotly_array(shown_figure(at, "Layer 2 head 3").data[0].z),
                               weights)
    page = next(h.value for h in at.html if "attention from query" in h.value)
    assert f"attention from query 3 (outlined), layer 2 head 3: {weights[3, 1]:.6g}" in page
    assert page.count("2px solid #d62728") == 1  # the query outlined
    assert sorted(full.tables) == sorted(tokenprobe.open_run(root / "full").tables)  # not stored


@pytest.mark.parametrize("path", ["../outside", "/etc", "full/../../x"])
def test_path_outside_the_root_is_refused(root, monkeypatch, path):
    at = app(root, monkeypatch, run=path)
    assert not at.exception
    assert "outside the runs root" in texts(at.error)
    assert charts(at) == 0
    at = app(root, monkeypatch)
    at.text_input(key="run-path").set_value(path).run()
    assert "outside the runs root" in texts(at.error)


@pytest.mark.parametrize("how", ["name", "symlink"])
def test_run_json_naming_files_outside_the_run_is_refused(root, tmp_path, monkeypatch, how):
    served, secret = tmp_path / "served", tmp_path / "outside" / "secret"
    secret.mkdir(parents=True)
    run = tokenprobe.open_run(root / "partial")
    run.prompts.assign(text="TOP SECRET").to_parquet(secret / "prompts.parquet", index=False)
    evil = run.save(served / "evil")
    if how == "name":  # ../../outside/secret/prompts from served/evil
        meta = json.loads((evil / "run.json").read_text())
        meta["tables"] = [t if t != "prompts" else "../../outside/secret/prompts"
                          for t in meta["tables"]]
        (evil / "run.json").write_text(json.dumps(meta))
        message = "never a path"
    else:
        (evil / "prompts" / "part-000000.parquet").unlink()
        (evil / "prompts" / "part-000000.parquet").symlink_to(secret / "prompts.parquet")
        message = "outside the run directory"
    at = app(served, monkeypatch, run="evil")
    assert not at.exception
    assert message in texts(at.error)
    assert not [s for s in at.selectbox if s.key == "run-prompt"] and charts(at) == 0


def test_empty_root(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch)
    assert not at.exception
    assert "No runs under" in texts(at.info)


def test_compare_page(root, monkeypatch):
    at = app(root, monkeypatch, page="Compare", a="full", b="critical")  # runs from the URL
    assert not at.exception and not at.error
    assert at.selectbox(key="cmpA-name").value == "full"
    assert at.selectbox(key="cmpB-name").value == "critical"
    assert len(at.html) == 3  # A, B and B - A
    assert "B - A" in at.html[2].value
    at.radio(key="cmp-kind").set_value("Heads").run()
    assert charts(at) == 3 and not at.warning
    at.radio(key="cmp-kind").set_value("Layers").run()
    at.selectbox(key="cmp-Layers").set_value("resid_norm").run()
    assert charts(at) == 3 and not at.exception
    at.selectbox(key="cmpB-name").set_value("partial").run()
    assert charts(at) == 3  # resid_norm is in both
    at.radio(key="cmp-kind").set_value("Heads").run()
    assert "written by the sinks probe" in texts(at.info)
    tables = [d.value for d in at.dataframe if "same_text" in d.value.columns]
    assert tables[0].same_text.all()


def test_live_run(root, monkeypatch):
    at = app(root, monkeypatch, page="Live run")
    assert not at.exception
    at.text_area(key="form-prompt").set_value("Hello live world")
    at.selectbox(key="form-model").set_value("tiny-llama")
    at.multiselect(key="form-probes").set_value(["activations", "sinks"])
    at.text_input(key="form-name").set_value("live-test")
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert "Saved as run live-test" in texts(at.success)
    assert tokenprobe.open_run(root / "live-test").prompts.text.tolist() == ["Hello live world"]
    assert token_text(at.html[0].value) == "Hello·live·world"
    assert charts(at) == 3
    at.text_input(key="form-name").set_value("../escape")
    at.button[0].click().run()
    assert "letters, digits" in texts(at.error)
    at.text_input(key="form-name").set_value("")
    at.text_area(key="form-prompt").set_value("   ")
    at.button[0].click().run()
    assert "empty" in texts(at.error).lower() or "whitespace" in texts(at.error).lower()


def test_cli_app_refuses_a_missing_root(tmp_path, capsys):
    from tokenprobe.cli.args import EXIT_USAGE
    from tokenprobe.cli.main import main

    assert main(["app", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["app", "--help"])
    assert "--port" in capsys.readouterr().out


def test_a_two_model_run_shows_its_measures_and_tips_plane(tmp_path, monkeypatch, tiny_llama):
    from test_entropy import perturbed

    probe = EntropyProbe(compare=perturbed(tiny_llama))
    run = tokenprobe.run(tiny_llama, PROMPTS, [probe], out=tmp_path / "two", progress=False)
    at = app(tmp_path, monkeypatch, run="two")
    assert not at.exception and not at.error
    offered = at.selectbox(key="run-metric").options
    for name in ("jsd", "kl_student_teacher", "teacher_entropy", "tip_quadrant"):
        assert any(o.startswith(f"{name}:") for o in offered), name
    at.selectbox(key="run-metric").set_value("tip_quadrant").run()
    assert "high_H_high_D" in at.html[0].value and not at.exception
    assert "top here: &#x27;" in at.html[0].value  # the model's top-3 alternatives on hover
    from tokenprobe.analyses.two_model_views import tip_points

    points = tip_points(run)
    assert len(points) == int((run.tokens.pos > 0).sum())
    assert points.norm_jsd.between(0, 1).all()
    assert any("TIP" in str(h.value) for h in at.subheader)


def test_compare_page_across_tokenisers_goes_per_word(tmp_path, monkeypatch, tiny_llama,
                                                      tiny_gemma3):
    from tokenprobe.analyses.span_compare import span_difference

    a = tokenprobe.run(tiny_llama, PROMPTS, ["entropy"], out=tmp_path / "llama", progress=False)
    b = tokenprobe.run(tiny_gemma3, PROMPTS, ["entropy"], out=tmp_path / "gemma", progress=False)
    at = app(tmp_path, monkeypatch, page="Compare", a="llama", b="gemma")
    assert not at.exception and not at.error and not at.warning
    assert "tokenise this prompt differently" in texts(at.caption)
    diff = at.html[2].value
    words = span_difference(a, b, 0, "entropy")
    shown = html.unescape("".join(re.findall(r'class="tp-tok"[^>]*>([^<]*)</span>', diff)))
    assert shown == "".join(words.shown)  # one coloured box per word of the text
    table = next(d.value for d in at.dataframe if "value_a" in d.value.columns)
    np.testing.assert_allclose(table.value, table.value_b - table.value_a)
    at.selectbox(key="cmp-span-agg").set_value("max").run()
    table = next(d.value for d in at.dataframe if "value_a" in d.value.columns)
    np.testing.assert_allclose(table.value_a, span_difference(a, b, 0, "entropy", agg="max")
                               .value_a)


def test_a_unit_attribution_run_has_its_tab(tmp_path, monkeypatch, tiny_llama):
    from tokenprobe.analyses import unit_views
    from tokenprobe.analyses.unit_attribution import UnitAttributionConfig, unit_attribution_run

    run = unit_attribution_run(tiny_llama, ["The cat sat on the mat"], UnitAttributionConfig(
        methods=("shapley", "removal"), permutations=8, compression=True, draws=2),
        options=(" and", " but"), out=tmp_path / "units")
    at = app(tmp_path, monkeypatch, run="units")
    assert not at.exception and not at.error
    assert at.selectbox(key="run-units-method").options == ["shapley", "removal"]
    units = unit_views.unit_rows(run, 0, "shapley")
    boxes = html.unescape("".join(re.findall(r'class="tp-tok"[^>]*>([^<]*)</span>',
                                             at.html[0].value)))
    assert boxes == "".join(units.shown)  # one box per unit, the whole text
    assert "± " in at.html[0].value  # the sampled values' standard errors on hover
    assert charts(at) >= 2 and "units kept" not in texts(at.info)
    bars = unit_views.unit_bars(run, 0, "shapley")
    np.testing.assert_allclose(bars.data[0].error_y.array, 1.96 * units.se)
    assert unit_views.unit_bars(run, 0, "removal").data[0].error_y.array is None
    curve = unit_views.curve_figure(run, 0)
    top = run.attribution_curves[run.attribution_curves.order == "top"]
    np.testing.assert_allclose(curve.data[0].y, top.sort_values("keep_fraction").value)
