"""Paper figures: ticks that never overlap at 3.3 in and 7 in, titles with units, figures named
by model with captions, runs side by side; on synthetic 30- and 18-layer runs with 44 tokens."""
from __future__ import annotations

import html
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from conftest import require_tool

from tokenprobe.analyses import figure_layout, figures, report_export, views
from tokenprobe.analyses.figure_layout import CHAR_EM, LINE_EM, PT_PER_PX, thin_ticks
from tokenprobe.analyses.figures_compare import compare_figure, compare_frames
from tokenprobe.cli.main import main
from tokenprobe.store import Run

TEXT = ("The capital of France is Paris, and the capital of Italy is Rome; Berlin, in turn, "
        "is the capital of Germany, which borders France.")
MODELS = {"smollm2": ("HuggingFaceTB/SmolLM2-135M", 30, 9, 44),  # name, layers, heads, tokens
          "gemma3": ("google/gemma-3-270m", 18, 4, 41)}


def synthetic_run(model: str, n_layers: int, n_heads: int, n_pos: int, seed: int = 0) -> Run:
    """A run with the tables the report's figures read: prompts, tokens, heads (sink_mass),
    token_layers (resid_norm, max_abs, attn_received) and massive, for one prompt of
    `n_pos` tokens; a massive dim at position 0 from layer 2 on, as in real models."""
    rng = np.random.default_rng(seed)
    words = (["<bos>"] + re.findall(r"\w+|[^\w\s]", TEXT) * 3)[:n_pos]
    tokens = pd.DataFrame({"prompt_id": 0, "pos": range(n_pos), "token_id": range(n_pos),
                           "token": words,
                           "token_raw": [w if i == 0 else " " + w for i, w in enumerate(words)],
                           "is_special": [i == 0 for i in range(n_pos)]})
    heads = pd.DataFrame([{"prompt_id": 0, "layer": layer, "head": h,
                           "sink_mass": float(min(1, 0.1 + 0.8 * layer / n_layers
                                                  + 0.1 * rng.random())),
                           "attn_entropy": float(rng.random())}
                          for layer in range(n_layers) for h in range(n_heads)])
    grid = [(layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    big = [1500.0 * (layer + 1) if pos == 0 and layer >= 2 else 5 + rng.random()
           for layer, pos in grid]
    token_layers = pd.DataFrame({
        "prompt_id": 0, "layer": [g[0] for g in grid], "pos": [g[1] for g in grid],
        "resid_norm": [10 * b for b in big], "max_abs": big, "max_abs_dim": 507,
        "attn_received": [0.8 if pos == 0 else 0.2 / n_pos for _, pos in grid]})
    massive = pd.DataFrame([{"prompt_id": 0, "layer": layer, "pos": 0, "dim": dim,
                             "value": 1500.0 * (layer + 1) * sign, "ratio_to_median": 3e3}
                            for layer in range(2, n_layers) for dim, sign in ((507, 1),
                                                                               (1, -1))])
    prompts = pd.DataFrame({"prompt_id": [0], "text": [TEXT], "n_tokens": [n_pos],
                            "mean_entropy": [np.nan]})
    meta = {"model": model, "n_layers": n_layers, "created": "2026-01-01",
            "probes": [{"name": "activations", "abs_threshold": 100.0, "median_ratio": 1000.0},
                       {"name": "sinks", "k_pos": 0, "eps": 0.3}]}
    return Run({"prompts": prompts, "tokens": tokens, "heads": heads,
                "token_layers": token_layers, "massive": massive}, meta)


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {key: synthetic_run(name, *shape) for key, (name, *shape) in MODELS.items()}


def builders(run: Run) -> dict[str, object]:
    """Each figure type of a run's report, built as the report builds it."""
    tokens = views.prompt_tokens(run, 0).shown.tolist()
    return {
        "sink_mass": figures.heatmap(views.head_grid(run, 0, "sink_mass"), title="t",
                                     x_title="head", value="sink_mass"),
        "resid_norm": figures.heatmap(views.layer_grid(run, 0, "resid_norm"), title="t",
                                      x_title="position", value="||h||", log=True,
                                      x_labels=tokens),
        "massive": figures.massive_figure(views.massive_points(run, 0),
                                          n_layers=int(run.meta["n_layers"]), tokens=tokens),
    }


# ---- the rule, without a browser ------------------------------------------------------------

def test_thinning_rule_fits_labels_in_the_axis():
    layers = [str(i) for i in range(30)]
    ticks = thin_ticks(layers, axis_pt=140, font_pt=7.5, horizontal=False)
    assert ticks.keep == [0, 5, 10, 15, 20, 25]  # 1.8 em = 13.5 pt a label: 10 fit -> step 5
    assert thin_ticks(layers[:4], 140, 7.5, horizontal=False).keep == [0, 1, 2, 3]
    words = [f"{i}:token{i}" for i in range(44)]
    flat = thin_ticks(words, 400, 7.5, horizontal=True)
    assert flat.angle == -90 and flat.keep[1] == 2  # turned: 29 fit of 44 -> step 2
    assert all(len(t) <= figure_layout.MAX_CHARS for t in flat.text)
    assert figure_layout.nice_step(30, 7) == 5 and figure_layout.nice_step(300, 7) == 50


def test_titles_are_readable_and_have_units(runs):
    built = builders(runs["smollm2"])
    assert built["sink_mass"].data[0].colorbar.title.text == "sink mass (attention to key 0)"
    assert built["resid_norm"].data[0].colorbar.title.text == "||h|| (residual L2 norm)"
    assert built["massive"].layout.xaxis.title.text == "layer (block output)"
    assert figure_layout.human_title("max_abs") == "max |h| (activation)"


def test_massive_figure_has_a_marker_size_legend(runs):
    plain = builders(runs["smollm2"])["massive"]
    assert [t.name for t in plain.data] == ["dim 1", "dim 507"]  # the dashboard's figure
    for fig in (figures.massive_figure(views.massive_points(runs["smollm2"], 0), n_layers=30,
                                       tokens=["t"] * 44, size_legend=True),
                report_export.styled(plain, report_export.paper_style("single"))):
        sizes = [t for t in fig.data if t.meta == "size"]
        assert [t.name for t in sizes] == ["|h| 1e3", "|h| 1e4", "|h| 1e5"]
        assert sizes[0].marker.size < sizes[-1].marker.size
        dim = next(t for t in fig.data if t.name == "dim 507")
        assert max(dim.marker.size) <= sizes[-1].marker.size


def test_latex_has_one_missing_value_marker():
    frame = pd.DataFrame({"x": [1.5, np.nan], "t": ["a", None], "o": [np.nan, "b"],
                          "i": pd.array([1, None], dtype="Int64")})
    tex = report_export.to_latex(frame, caption="c", label="t")
    assert "nan" not in tex.lower().replace("\\end", "") and tex.count("--") == 4


def test_paper_widths():
    assert report_export.paper_style("single").width == 317
    assert report_export.paper_style("double").width == 672
    assert report_export.paper_style("4.5").width == 432
    with pytest.raises(ValueError):
        report_export.paper_style("wide")


# ---- the layout plotly draws (kaleido) ------------------------------------------------------

def use_browser(monkeypatch) -> None:
    """Skip (or fail, where the browser is required) without Chrome / Chromium; else point
    kaleido at it."""
    browser = report_export.find_browser()
    require_tool("Chrome or Chromium for kaleido", browser, "browser")
    monkeypatch.setenv("BROWSER_PATH", browser)


def all_figures(runs: dict[str, Run]) -> dict[str, object]:
    """Every figure type per model, and the runs side by side for each compared measure."""
    out = {f"{key}_{kind}": fig for key, run in runs.items()
           for kind, fig in builders(run).items()}
    frames = {key: compare_frames(run, 0) for key, run in runs.items()}
    for measure in ("sink_mass", "massive", "attn_received"):
        out[f"compare_{measure}"] = compare_figure(
            [(runs[k].meta["model"], frames[k][measure]) for k in runs], measure)
    return out


TICK = re.compile(r'<g class="(?P<axis>[xy]\d*tick|ycb\w*tick)">(?P<tag><text[^>]*>)'
                  r"(?P<text>[^<]*)</text>")


def overlaps(svg: str) -> list[str]:
    """Where neighbouring tick labels of the rendered figure collide, and any text under 7 pt.

    Each axis' labels are placed where plotly drew them (their `translate`); two neighbours
    collide when their centres are closer than half their widths added (chars x CHAR_EM x
    font: flat labels on an x axis) or than a line (LINE_EM x font: y axes, colour bars and
    turned labels)."""
    bad = [f"{size} px text" for size in map(float, re.findall(r"font-size: ([\d.]+)px", svg))
           if size * PT_PER_PX < 7]
    axes: dict[str, list[tuple[float, str, bool]]] = {}
    for m in TICK.finditer(svg):
        move = re.search(r"translate\(([-\d.e]+),([-\d.e]+)\)", m["tag"])
        size = float(re.search(r"font-size: ([\d.]+)px", m["tag"])[1])
        horizontal = m["axis"].startswith("x")
        where = float(move[1] if horizontal else move[2]) if move else 0.0
        text = html.unescape(m["text"])
        axes.setdefault(m["axis"], []).append((where, text, horizontal and "rotate(" not in
                                               m["tag"], size))
    for axis, ticks in axes.items():
        ticks.sort()
        for (a, ta, flat, size), (b, tb, _, _) in zip(ticks, ticks[1:]):
            need = ((len(ta) + len(tb)) / 2 * CHAR_EM if flat else LINE_EM) * size
            if b - a < need:
                bad.append(f"{axis}: {ta!r} and {tb!r} {b - a:.1f} px apart, need {need:.1f}")
    return bad


@pytest.fixture(scope="module")
def rendered(runs, tmp_path_factory) -> dict[tuple[str, str], str]:
    """(figure, width) -> the SVG kaleido drew at 3.3 in and 7 in (one browser for all), with
    the layout before issue 20 (every one of 30 layers labelled) as `old_sink_mass`."""
    browser = report_export.find_browser()
    require_tool("Chrome or Chromium for kaleido", browser, "browser")
    import kaleido

    directory = tmp_path_factory.mktemp("svg")
    figures_ = all_figures(runs)
    items, paths = [], {}
    for width in ("single", "double"):
        style = report_export.paper_style(width)
        styled = {name: report_export.styled(fig, style) for name, fig in figures_.items()}
        old = report_export.styled(figures_["smollm2_sink_mass"], style)
        styled["old_sink_mass"] = old.update_yaxes(tickvals=list(range(30)),
                                                   ticktext=[str(i) for i in range(30)])
        for name, fig in styled.items():
            paths[name, width] = directory / f"{name}-{width}.svg"
            items.append({"fig": fig, "path": str(paths[name, width]),
                          "opts": {"format": "svg", "width": style.width,
                                   "height": style.height}})
    previous = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        kaleido.write_fig_from_object_sync(items, kopts={"n": 1, "mathjax": False})
    finally:
        os.environ.pop("BROWSER_PATH") if previous is None else os.environ.update(
            BROWSER_PATH=previous)
    return {key: path.read_text(encoding="utf-8") for key, path in paths.items()}


@pytest.mark.browser
@pytest.mark.parametrize("width", ["single", "double"])
def test_no_tick_labels_overlap_at_paper_sizes(rendered, runs, width):
    names = [n for n, w in rendered if w == width and n != "old_sink_mass"]
    assert len(names) == 9  # 3 figure types x 2 models, 3 comparisons
    for name in names:
        svg = rendered[name, width]
        assert not overlaps(svg), (name, overlaps(svg))
        ticks = {m["axis"] for m in TICK.finditer(svg)}
        assert {"xtick", "ytick"} <= ticks, name  # both axes still labelled
    smol = [m["text"] for m in TICK.finditer(rendered["smollm2_sink_mass", width])
            if m["axis"] == "ytick"]
    assert 4 <= len(smol) < 30 and smol[0] == "0"


@pytest.mark.browser
def test_the_old_layout_overlaps(rendered):
    """The check fails on the layout before issue 20: each of 30 layers labelled."""
    assert overlaps(rendered["old_sink_mass", "single"])
    assert overlaps(rendered["old_sink_mass", "double"])


def test_colour_bar_titles_have_units(runs):
    for width in ("single", "double"):
        style = report_export.paper_style(width)
        for name, fig in all_figures(runs).items():
            for trace in report_export.styled(fig, style).data:
                if trace.type == "heatmap":
                    title = trace.colorbar.title.text.replace("<br>", " ")
                    assert "_" not in title and "(" in title, (name, title)


@pytest.mark.browser
def test_report_names_figures_by_model_with_captions(runs, tmp_path, monkeypatch):
    use_browser(monkeypatch)
    dirs = [runs[k].save(tmp_path / f"run-{k}") for k in MODELS]
    out = tmp_path / "rep"
    assert main(["report", *map(str, dirs), "--out", str(out), "--style", "paper", "--width",
                 "double", "--compare-runs", "--max-prompts", "1", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = manifest["figures"]
    assert "run-smollm2_HuggingFaceTB-SmolLM2-135M_p0_massive" in names
    assert "run-gemma3_google-gemma-3-270m_p0_sink_mass" in names
    assert ("compare_run-smollm2_HuggingFaceTB-SmolLM2-135M_vs_run-gemma3_google-gemma-3-270m"
            "_p0_sink_mass") in names
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)
        caption = (out / "figures" / f"{name}.txt").read_text().strip()
        assert caption.endswith(".") and caption.count(". ") == 0, caption
        assert "prompt 0" in caption and "(run run-" in caption
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert abs(int.from_bytes(png[16:20], "big") - 672 * 300 / 96) <= 1  # 7 in, 300 dpi
    assert "HuggingFaceTB/SmolLM2-135M (run run-smollm2)" in manifest["captions"][names[0]] \
        or any("SmolLM2" in c for c in manifest["captions"].values())
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="compare"' in page and "figures/run-smollm2_HuggingFaceTB" in page
    assert not list((out / "figures").glob("r0_*"))
    tex = (out / "tables" / "summary.tex").read_text()
    assert "nan" not in tex.replace("\\end", "")


def test_width_needs_paper_style_and_compare_needs_two_runs(runs, tmp_path, capsys):
    run_dir = runs["gemma3"].save(tmp_path / "g")
    assert main(["report", str(run_dir), "--out", str(tmp_path / "a"), "--width",
                 "double"]) == 2
    assert main(["report", str(run_dir), "--out", str(tmp_path / "b"), "--compare-runs"]) == 2
    assert main(["report", str(run_dir), "--out", str(tmp_path / "c"), "--style", "paper",
                 "--width", "wide"]) == 2
    assert "--width" in capsys.readouterr().err
