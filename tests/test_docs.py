"""The project describes its own measures: nothing it ships points at the team's notes."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["README.md", "docs", "pyproject.toml", "Makefile", "tokenprobe", "probes", "kernels",
           "analyses", "app", "notebooks", "benchmarks"]
TEAM_NOTES = re.compile(r"shared/(methods|style)\.md|\.\./shared\b")


def test_nothing_shipped_points_at_the_team_notes():
    found = []
    for entry in SHIPPED:
        path = ROOT / entry
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file() and file.suffix in {".md", ".py", ".toml", ".json", ".ipynb", ""}:
                text = file.read_text(errors="replace")
                found += [f"{file.relative_to(ROOT)}: {m.group(0)}"
                          for m in TEAM_NOTES.finditer(text)]
    assert not found, found


def test_the_readme_defines_every_measure_it_names():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Measures"):readme.index("## Probes and definitions")]
    for measure in ("entropy", "self_certainty", "window_entropy", "forking", "critical_ce",
                    "sink_mass", "sink_rate", "attn_received", "Secondary sinks", "Value drain",
                    "ZeroTuning", "Massive", "cos_to_first", "Rollout search", "Pass@k",
                    "Counterfactual", "Attribution by ablation", "Logit lens"):
        assert measure in section, measure


def declared_tables() -> dict:
    """Every declared table: the core's, each probe's and each study's (what `tokenprobe
    tables` imports before it describes them)."""
    import tokenprobe.analyses.attribution  # noqa: F401  (each study declares its tables)
    import tokenprobe.analyses.counterfactual  # noqa: F401
    import tokenprobe.analyses.critical  # noqa: F401
    import tokenprobe.analyses.spans  # noqa: F401
    from tokenprobe.probe import registry
    from tokenprobe.tables import TABLES

    registry()
    return TABLES


def test_the_docs_name_every_declared_column():
    docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "methods.md").read_text()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", docs))
    missing = [f"{name}.{column}" for name, table in declared_tables().items()
               for column in table.columns if column not in words]
    assert not missing, f"columns neither README.md nor docs/methods.md names: {missing}"


def test_the_methods_page_is_linked_and_its_links_resolve():
    methods = (ROOT / "docs" / "methods.md").read_text()
    assert "(docs/methods.md)" in (ROOT / "README.md").read_text()
    assert "docs/methods.md" in (ROOT / "app" / "dashboard.py").read_text()
    # every in-page link has its target: a heading's GitHub anchor or an explicit <a id>
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', methods))
    for heading in re.findall(r"^#+ (.+)$", methods, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    links = re.findall(r"\]\(#([^)]+)\)", methods)
    assert links and not [a for a in links if a not in anchors]


def test_every_replication_card_points_at_its_definition():
    from tokenprobe.analyses.replication import paper_figures

    methods = (ROOT / "docs" / "methods.md").read_text()
    measures = [m for m in paper_figures() if not m.startswith("_")]
    assert measures and not [m for m in measures if f'<a id="{m}"></a>' not in methods]
    assert "docs/methods.md#{" in (ROOT / "analyses" / "report_sections.py").read_text()


def test_dir_lists_the_lazy_public_api():
    import tokenprobe

    names = dir(tokenprobe)
    for name in ("run", "load", "open_run", "Run", "LoadedModel", "DEFAULT_MODEL"):
        assert name in names and name in tokenprobe.__all__, name
    assert set(tokenprobe.__all__) <= set(names)
    for name in tokenprobe.__all__:
        assert getattr(tokenprobe, name) is not None, name
    assert callable(tokenprobe.run) and callable(tokenprobe.load) and callable(tokenprobe.open_run)
    assert "importlib" not in names  # the module's own plumbing stays out of completion
