"""benchmarks/gpu_check.py, the prepared device check, run here under TRITON_INTERPRET=1."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_runs_interpreted(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.csv"
    assert gpu_check.main(["--device", "cpu", "--T", "16", "--repeats", "1",
                           "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    errors = [float(r["value"]) for r in rows if r["metric"] == "max_error"]
    assert len(errors) == 12 and max(errors) < 2e-2
    assert {r["metric"] for r in rows if r["x_value"] == "16"} == {"time_s", "time_ratio"}
    assert "0 correctness case(s) failed" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 2
