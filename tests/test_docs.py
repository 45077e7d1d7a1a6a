"""The project describes its own measures: nothing it ships points at the team's notes."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["README.md", "pyproject.toml", "Makefile", "tokenprobe", "probes", "kernels",
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
