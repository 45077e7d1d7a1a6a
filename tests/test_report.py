"""Reports: real tiny-llama runs and Parquet, HTML, static figures, LaTeX tables and the CLI."""
from __future__ import annotations

import html
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import require_tool

import tokenprobe
from tokenprobe.analyses import report_export
from tokenprobe.analyses.replication import NOT_REPORTED, paper_figures, replication_cards
from tokenprobe.analyses.report import cross_run_summary, load_runs, write_report
from tokenprobe.analyses.sink_curve import long_prose, rotated_documents, sink_rate_curve
from tokenprobe.analyses.sinks import sink_rate
from tokenprobe.cli.main import main
from tokenprobe.probes import ActivationsProbe, EntropyProbe, SinksConfig, SinksProbe
from tokenprobe.store import Run, RunNotFoundError

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi_there: 100% & {braces} #1\n\tok",
           "the cat sat on the mat."]


@pytest.fixture(scope="module")
def run_dirs(tiny_llama, tmp_path_factory) -> list[Path]:
    """Two real runs saved as directories: all probes with eps 0.11 (the tiny random model
    attends almost uniformly, so its prompts fall on both sides of it), and sinks only with the
    default eps at T = 8."""
    root = tmp_path_factory.mktemp("runs")
    probes = [ActivationsProbe(), SinksProbe(SinksConfig(eps=0.11)), EntropyProbe()]
    full = tokenprobe.run(tiny_llama, PROMPTS, probes, progress=False)
    short = tokenprobe.run(tiny_llama, PROMPTS, ["sinks"], max_tokens=8, progress=False)
    return [full.save(root / "full"), short.save(root / "short")]


@pytest.fixture(scope="module")
def report(run_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "report"
    return write_report(run_dirs, out, static=False)


def test_cross_run_sink_rate_matches_the_analysis(run_dirs, tmp_path):
    runs = load_runs(run_dirs, tmp_path)
    summary = cross_run_summary(runs).set_index("run")
    for label, run, _ in runs:
        expected = sink_rate(run, by_prompt=False).iloc[0]
        assert summary.loc[label, "sink_rate"] == pytest.approx(expected.sink_rate)
        assert summary.loc[label, "eps"] == expected.eps
        assert summary.loc[label, "T_max"] == expected.T_max
    assert 0 < summary.loc[str(run_dirs[0]), "sink_rate"] < 100  # eps 0.11: some, not all
    full = runs[0][1]
    assert summary.loc[str(run_dirs[0]), "mean_entropy"] == pytest.approx(
        full.tokens.entropy.dropna().mean())
    assert pd.isna(summary.loc[str(run_dirs[1]), "mean_entropy"])  # no entropy probe
    assert summary.loc[str(run_dirs[1]), "T_max"] == 8


def test_html_is_self_contained(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    assert page.count("Plotly.newPlot") >= 2
    assert len(page) > 1_000_000  # plotly.js itself is inlined (about 4.6 MB)
    assert page.count("* plotly.js v") == 1  # once, not per figure
    srcs = [s for s in page.split("<script")[1:] if "src=" in s.split(">")[0]]
    assert not srcs, "no <script src=...>: the page must open with no network"
    assert "http://" not in "".join(s.split(">")[0] for s in page.split("<script")[1:])
    assert "sink_rate" in page and "not reported here" in page


def test_tables_as_csv_and_booktabs(report, run_dirs):
    tables = report / "tables"
    manifest = json.loads((report / "manifest.json").read_text())
    assert "summary" in manifest["tables"] and "r0_card_sink_rate" in manifest["tables"]
    for name in manifest["tables"]:
        assert (tables / f"{name}.csv").stat().st_size > 0
        tex = (tables / f"{name}.tex").read_text()
        assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    prompts = (tables / "r0_prompts.tex").read_text()
    assert r"Hi\_there: 100\% \& \{braces\} \#1\textbackslash{}n\textbackslash{}tok" in prompts
    rates = pd.read_csv(tables / "r0_sink_rate.csv")
    expected = sink_rate(tokenprobe.open_run(run_dirs[0]))
    assert rates.sink_rate.to_list() == pytest.approx(expected.sink_rate.to_list())


def test_latex_tables_mark_missing_values_one_way(report):
    """Every missing cell of every LaTeX table is `--` (the short run has no entropy, so the
    summary's mean_entropy is missing): never `nan`, `None` or `<NA>`."""
    for tex in (report / "tables").glob("*.tex"):
        cells = [c.strip() for line in tex.read_text().splitlines() if line.endswith(r"\\")
                 for c in line[:-2].split("&")]
        assert not {"nan", "NaN", "None", "<NA>", r"\textless{}NA\textgreater{}"} & set(cells), \
            tex.name
    lines = (report / "tables" / "summary.tex").read_text().splitlines()
    header = [c.strip() for c in lines[lines.index(r"\toprule") + 1][:-2].split("&")]
    short = [c.strip() for c in lines[lines.index(r"\bottomrule") - 1][:-2].split("&")]
    assert short[header.index(r"mean\_entropy")] == "--"  # the short run has no entropy


@pytest.mark.latex
def test_latex_tables_compile(report, tmp_path):
    require_tool("pdflatex with booktabs", shutil.which("pdflatex"), "latex")
    files = sorted((report / "tables").glob("*.tex"))
    inputs = "\n".join(rf"\input{{{p.as_posix()}}}" for p in files)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                      f"\\begin{{document}}\n{inputs}\n\\end{{document}}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "doc.pdf").read_bytes()[:5] == b"%PDF-"


def test_latex_escape_handles_specials_and_unicode():
    assert report_export.latex_escape("a_b%") == r"a\_b\%"
    assert report_export.latex_escape("·↵") == "U+00B7U+21B5"
    assert report_export.latex_escape("x\\y") == r"x\textbackslash{}y"


@pytest.mark.browser
def test_static_figures(run_dirs, tmp_path):
    require_tool("Chrome or Chromium for kaleido", report_export.find_browser(), "browser")
    out = write_report(run_dirs, tmp_path / "rep", style="paper", static=True, max_prompts=1,
                       compare=True)
    manifest = json.loads((out / "manifest.json").read_text())
    names, files = manifest["figures"], manifest["figure_files"]
    assert {"r0_p0_sink_mass", "r0_p0_resid_norm"} <= set(files)
    assert files["r0_p0_sink_mass"] == "full_tiny-llama_p0_sink_mass"  # named by run and model
    assert any(n.startswith("compare_full_tiny-llama_vs_short_tiny-llama_p0_") for n in names)
    assert sorted(files.values()) == names and not list((out / "figures").glob("r0_*"))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="compare"' in page
    for name in names:
        assert html.escape(manifest["captions"][name]) in page
        assert (out / "figures" / f"{name}.txt").read_text().strip() == manifest["captions"][name]
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(png[16:20], "big")
        assert abs(width - 317 * 300 / 96) <= 1  # 3.3 in column at 300 dpi
        root = ET.parse(out / "figures" / f"{name}.svg").getroot()
        assert root.tag.endswith("svg")
        assert (out / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_no_browser_skips_static_figures_and_says_so(run_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    out = write_report(run_dirs[1:], tmp_path / "rep")
    assert not (out / "figures").exists()
    assert "no Chrome or Chromium" in json.loads((out / "manifest.json").read_text())["notes"][0]
    with pytest.raises(RuntimeError, match="no Chrome or Chromium"):
        write_report(run_dirs[1:], tmp_path / "rep2", static=True)
    assert not (tmp_path / "rep2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep2")]  # staging removed


def test_refuses_to_overwrite(run_dirs, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_report(run_dirs[1:], out, static=False)
    assert (out / "keep.txt").read_text() == "mine"
    write_report(run_dirs[1:], out, static=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "report.html").exists()


def test_replication_cards(run_dirs):
    run = tokenprobe.open_run(run_dirs[0])
    cards = {c.measure: c for c in replication_cards(run)}
    assert {"sink_rate", "massive_activations", "secondary_sinks", "forking_tokens"} <= set(cards)
    sink = cards["sink_rate"].frame()
    paper = sink[sink.source == "paper"].set_index("model").figure
    assert paper["LLaMA2-7B Base"] == "92.47 %"
    ours = sink[sink.source == "ours"].figure.iloc[0]
    assert ours == f"{sink_rate(run, by_prompt=False).sink_rate.iloc[0]:.2f} %"
    assert "T = 64" in cards["sink_rate"].setting and "eps = 0.3" in cards["sink_rate"].setting
    assert "median_ratio = 1000" in cards["massive_activations"].setting
    assert NOT_REPORTED in cards["massive_activations"].frame().figure.to_list()


def test_paper_figures_are_cited():
    for measure, entry in paper_figures().items():
        assert entry["paper"] and entry["checked_against"] and entry["setting"], measure


def test_sink_rate_curve_matches_single_runs(tiny_llama):
    texts = PROMPTS[:2]
    curve = sink_rate_curve(tiny_llama, texts, [4, 8, 64, 128], name="tiny-llama")
    assert curve["T"].to_list() == [4, 8, 64, 128]
    one = tokenprobe.run(tiny_llama, texts, ["sinks"], max_tokens=8, progress=False)
    assert curve.set_index("T").sink_rate[8] == pytest.approx(
        sink_rate(one, by_prompt=False).sink_rate.iloc[0])
    assert curve.set_index("T").T_reached_max[4] == 4
    longest = curve.set_index("T").T_reached_max[64]
    assert longest < 64  # the texts are short: the T reached is reported, not the T asked
    assert curve.set_index("T").loc[128].drop("T", errors="ignore").equals(
        curve.set_index("T").loc[64])


def test_rotated_documents():
    docs = rotated_documents(["a", "b", "c"])
    assert docs == ["a\n\nb\n\nc", "b\n\nc\n\na", "c\n\na\n\nb"]
    assert rotated_documents(["a", "b"], tail="z") == ["a\n\nb\n\nz", "b\n\na\n\nz"]
    assert len(long_prose()) == 8


def test_cli_report(run_dirs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, run_dirs), "--out", str(out), "--no-static",
                 "--quiet"]) == 0
    assert (out / "report.html").exists() and "report written" in capsys.readouterr().out
    assert main(["report", str(run_dirs[0]), "--out", str(out), "--no-static"]) == 4
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a complete tokenprobe run" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_report_refuses_a_run_json_naming_files_outside_the_run(run_dirs, tmp_path, capsys):
    run = tmp_path / "runs" / "evil"
    shutil.copytree(run_dirs[1], run)
    (tmp_path / "secret").mkdir()
    shutil.copy(run / "prompts" / "part-000000.parquet", tmp_path / "secret" / "prompts.parquet")
    meta = json.loads((run / "run.json").read_text())
    meta["tables"] = [t if t != "prompts" else "../../secret/prompts" for t in meta["tables"]]
    (run / "run.json").write_text(json.dumps(meta))
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-static"]) == 2
    assert "never a path" in capsys.readouterr().err
    with pytest.raises(RunNotFoundError, match="never a path"):
        write_report([run], tmp_path / "rep", static=False)
    assert not (tmp_path / "rep").exists()


def test_diagnostics_are_shown_as_caveats(run_dirs, tmp_path):
    """run.json's `diagnostics` (per probe, sentences saying where a measure means little) are
    a Diagnostics block of the run's section, as text; a run without any has none."""
    run = tokenprobe.open_run(run_dirs[1])  # sinks at T = 8 on a 3-layer model: two notes
    said = run.meta["diagnostics"]["sinks"]
    assert len(said) == 2
    crafted = Run(dict(run.tables.items()), {**run.meta, "diagnostics": {
        **run.meta["diagnostics"], "x<i>": ["<b>bold</b> & more"], "bad": "not a list"}})
    quiet = Run(dict(run.tables.items()), {**run.meta, "diagnostics": {}})
    out = write_report([crafted, quiet], tmp_path / "rep", static=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('<div class="diagnostics">') == 1  # the quiet run has no block
    block = page[page.index('<div class="diagnostics">'):]
    block = block[:block.index("</div>")]
    assert "<h3>Diagnostics</h3>" in block
    for sentence in said:
        assert f"<li><b>sinks</b>: {html.escape(sentence)}</li>" in block
    assert "<b>x&lt;i&gt;</b>: &lt;b&gt;bold&lt;/b&gt; &amp; more" in block
    assert "not a list" not in page
    assert page.index('id="run-0"') < page.index('<div class="diagnostics">') < page.index(
        'id="run-1"')


def test_cli_help():
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0


@pytest.mark.embedded
def test_report_of_an_embedded_run(smollm2, tmp_path):
    run = tokenprobe.run(smollm2, ["The capital of France is Paris."], ["activations", "sinks"],
                         progress=False)
    out = write_report([run], tmp_path / "rep", static=False)
    cards = pd.read_csv(out / "tables" / "r0_card_massive_activations.csv")
    ours = cards[cards.source == "ours"].set_index("what").figure
    assert ours["massive dims"] == "dims 507"  # SmolLM2's one massive dim (README)


def test_forking_card_on_a_response_scored_run(tiny_llama):
    pairs = [{"prompt": "Q: two and two?\nA:", "response": " four, because two and two make four."}]
    run = tokenprobe.run(tiny_llama, pairs, ["entropy"], progress=False)
    card = {c.measure: c for c in replication_cards(run)}["forking_tokens"].frame()
    scored = run.tokens[run.tokens.in_response.fillna(False).astype(bool) & (run.tokens.pos > 0)]
    ours = card[card.source == "ours"].set_index("what").figure
    key = next(w for w in ours.index if w.startswith("80th-percentile"))
    assert ours[key] == f"{np.quantile(scored.entropy, 0.8):.3f} nats"
    assert f"the {len(scored)} scored tokens (score = response)" in key
    assert card[card.source == "paper"].figure.iloc[0] == "0.672 nats"


def test_a_two_model_run_has_its_section(tiny_llama, tmp_path):
    from test_entropy import perturbed

    teacher = perturbed(tiny_llama)
    run = tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(compare=teacher)], progress=False)
    out = write_report([run.save(tmp_path / "two")], tmp_path / "rep", static=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Two models: tiny-llama (student) and tiny-llama-perturbed (teacher)" in page
    assert "fig-r0_tip" in page and "coloured by JSD" in page
    table = pd.read_csv(out / "tables" / "r0_two_models.csv").set_index("prompt_id")
    tokens = run.tokens[(run.tokens.pos > 0) & run.tokens.jsd.notna()]
    for pid, rows in tokens.groupby("prompt_id"):  # means and shares, computed here by hand
        assert table.loc[pid, "tokens"] == len(rows)
        assert table.loc[pid, "mean_jsd"] == pytest.approx(rows.jsd.mean())
        assert table.loc[pid, "mean_teacher_entropy"] == pytest.approx(rows.teacher_entropy.mean())
        share = 100 * (rows.tip_quadrant == "low_H_low_D").mean()
        assert table.loc[pid, "low_H_low_D_pct"] == pytest.approx(share)
    quadrant_columns = [c for c in table if c.endswith("_pct")]
    assert np.allclose(table[quadrant_columns].sum(axis=1), 100)

