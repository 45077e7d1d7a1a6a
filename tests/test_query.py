"""DuckDB over run directories."""
from __future__ import annotations

import pytest

import tokenprobe
from tokenprobe.query import query
from tokenprobe.store import RunNotFoundError


def test_query_over_two_runs(tiny_llama, tiny_gemma3, tmp_path):
    tokenprobe.run(tiny_llama, ["abc", "de"], out=tmp_path / "a", progress=False)
    tokenprobe.run(tiny_gemma3, ["abc"], out=tmp_path / "b", progress=False)
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    frame = query("SELECT run, count(*) AS n FROM tokens GROUP BY run ORDER BY run", runs)
    assert frame.n.tolist() == [5, 4]  # 3 + 2 bytes; gemma adds <bos> to 3 bytes
    layers = query("SELECT run, max(layer) AS top FROM token_layers GROUP BY run ORDER BY run",
                   runs)
    assert layers.top.tolist() == [2, 3]


def test_query_refuses_non_runs(tmp_path):
    with pytest.raises(RunNotFoundError):
        query("SELECT 1", [tmp_path])
