"""DuckDB over run directories, and its sandbox: read-only SELECTs over the run tables only."""
from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest

import tokenprobe
from tokenprobe.cli.args import EXIT_USAGE
from tokenprobe.cli.main import main
from tokenprobe.query import QueryError, connect, query
from tokenprobe.store import Run, RunNotFoundError


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


# ---- the sandbox ---------------------------------------------------------------------------

def small_run(directory: Path, model: str, *, massive: bool = True) -> str:
    """A hand-made run (prompts, tokens and, if `massive`, massive) saved to `directory`."""
    tables = {"prompts": pd.DataFrame({"prompt_id": [0, 1], "text": ["ab", "c"],
                                       "n_tokens": [2, 1]}),
              "tokens": pd.DataFrame({"prompt_id": [0, 0, 1], "pos": [0, 1, 0],
                                      "token": ["a", "b", "c"]})}
    if massive:
        tables["massive"] = pd.DataFrame({"prompt_id": [0, 0], "layer": [1, 2], "pos": [0, 0],
                                          "dim": [7, 7], "value": [-300.0, 500.0],
                                          "ratio_to_median": [1200.0, 2000.0]})
    return str(Run(tables, {"model": model}).save(directory))


@pytest.fixture
def world(tmp_path) -> dict[str, str]:
    """Two runs `a` (with massive) and `b` (without), and files outside them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("user,password\nroot,hunter2\n")
    (outside / "secret.txt").write_text("hunter2")
    (outside / "secret.json").write_text('{"password": "hunter2"}')
    pd.DataFrame({"password": ["hunter2"]}).to_parquet(outside / "secret.parquet")
    return {"a": small_run(tmp_path / "runs" / "a", "m1"),
            "b": small_run(tmp_path / "runs" / "b", "m2", massive=False),
            "out": str(outside), "tmp": str(tmp_path)}


def snapshot(root: str) -> dict[str, bytes]:
    """Every file under `root` with its bytes (directories too, as empty)."""
    return {str(p): (p.read_bytes() if p.is_file() else b"") for p in Path(root).rglob("*")}


LEGIT = [  # (sql, rows over runs a and b)
    ("SELECT run, layer, max(value) FROM massive GROUP BY ALL", 2),  # README
    ("SELECT layer, pos, dim, round(value) AS value, round(ratio_to_median) AS ratio FROM "
     "massive WHERE prompt_id = 0 ORDER BY layer LIMIT 5", 2),  # Makefile's demo
    ("SELECT * FROM tokens", 6),
    ("FROM tokens", 6),
    ("SELECT t.run, t.token, p.text FROM tokens t JOIN prompts p USING (run, prompt_id)", 6),
    ("SELECT run, count(*) AS n, avg(n_tokens) FROM prompts GROUP BY run ORDER BY run", 2),
    ("WITH per AS (SELECT run, count(*) AS n FROM tokens GROUP BY run) SELECT * FROM per", 2),
    ("DESCRIBE tokens", 4),
    ("SHOW TABLES", 3),
    ("SUMMARIZE tokens", 4),
    ("VALUES (1), (2)", 2),
    ("PIVOT tokens ON pos IN (0, 1) USING count(*) GROUP BY run", 2),
    ("SELECT 1; SELECT * FROM prompts", 4),  # several SELECTs: the last one's result
    ("-- a comment\nSELECT * FROM prompts /* and another */", 4),
]


@pytest.mark.parametrize("sql, rows", LEGIT)
def test_read_only_queries_work_over_two_runs(world, sql, rows):
    before = snapshot(world["tmp"])
    assert len(query(sql, [world["a"], world["b"]])) == rows
    assert snapshot(world["tmp"]) == before


def test_a_run_table_can_be_read_by_its_path_and_the_views_stay_lazy(world):
    file = str(Path(world["a"]).resolve() / "tokens" / "part-000000.parquet")
    assert query(f"SELECT token FROM read_parquet('{file}')", [world["a"]]).token.tolist() == [
        "a", "b", "c"]
    assert query("SELECT run, count(*) AS n FROM massive GROUP BY run", [world["a"], world["b"]]
                 ).to_dict("records") == [{"run": world["a"], "n": 2}]


def test_connect_registers_frames_and_takes_parameters(world):
    with connect([world["a"], world["b"]]) as con:
        assert con.tables == ["massive", "prompts", "tokens"]
        con.register("labels", pd.DataFrame({"run": [world["a"], world["b"]],
                                             "label": ["A", "B"]}))
        frame = con.query("SELECT l.label, count(*) AS n FROM tokens JOIN labels l USING (run) "
                          "WHERE pos >= ? GROUP BY ALL ORDER BY 1", [1])
        assert frame.to_dict("records") == [{"label": "A", "n": 1}, {"label": "B", "n": 1}]
        assert not hasattr(con, "execute")  # the unfiltered DuckDB connection is not handed out
        with pytest.raises(QueryError, match="COPY is not allowed"):
            con.query(f"COPY tokens TO '{world['out']}/x.csv'")
    assert not (Path(world["out"]) / "x.csv").exists()


def test_only_the_tables_run_json_lists_are_views(world):
    pd.DataFrame({"password": ["hunter2"]}).to_parquet(Path(world["a"]) / "stray.parquet")
    with pytest.raises(duckdb.CatalogException, match="stray"):
        query("SELECT * FROM stray", [world["a"]])
    with pytest.raises(QueryError, match="reads only the run tables"):
        query(f"SELECT * FROM read_parquet('{world['a']}/stray.parquet')", [world["a"]])


READS = [  # SELECTs that reach for a file that is not a run table: the sandbox refuses them
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/home/*')",
    "SELECT * FROM glob('{out}/*')",
    "SELECT * FROM glob('{a}/*')",
    "SELECT * FROM read_text('{out}/secret.txt')",
    "SELECT * FROM read_blob('{out}/secret.txt')",
    "SELECT * FROM read_text('{a}/run.json')",
    "SELECT * FROM read_parquet('{out}/secret.parquet')",
    "SELECT * FROM read_parquet(['{a}/tokens.parquet', '{out}/secret.parquet'])",
    "SELECT * FROM '{out}/secret.csv'",
    "FROM '{out}/secret.parquet'",
    "SELECT * FROM read_json_auto('{out}/secret.json')",
    "SELECT * FROM sniff_csv('{out}/secret.csv')",
    "SELECT * FROM parquet_metadata('{out}/secret.parquet')",
    "SELECT * FROM parquet_schema('{out}/secret.parquet')",
    "SELECT * FROM read_csv('{a}/../../outside/secret.csv')",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')",
]
STATEMENTS = [  # (sql, the refusal): no statement but SELECT runs, nothing is written
    ("COPY (SELECT 1) TO '{out}/new.csv'", "COPY is not allowed"),
    ("COPY (SELECT 1 AS x) TO '{a}/tokens.parquet' (FORMAT parquet, USE_TMP_FILE false)",
     "COPY is not allowed"),
    ("COPY tokens FROM '{out}/secret.csv'", "COPY is not allowed"),
    ("EXPORT DATABASE '{out}/dump'", "EXPORT is not allowed"),
    ("ATTACH '{out}/new.db' AS x", "ATTACH is not allowed"),
    ("ATTACH '{a}/tokens.parquet' AS x", "ATTACH is not allowed"),
    ("DETACH memory", "DETACH is not allowed"),
    ("INSTALL httpfs", "INSTALL is not allowed"),
    ("LOAD httpfs", "LOAD is not allowed"),
    ("SET enable_external_access = true", "SET is not allowed"),
    ("SET lock_configuration = false", "SET is not allowed"),
    ("RESET allowed_paths", "RESET (a statement of type SET) is not allowed"),
    ("PRAGMA database_list", "PRAGMA is not allowed"),
    ("PRAGMA enable_external_access = true", "PRAGMA (a statement of type SET) is not allowed"),
    ("CALL duckdb_settings()", "CALL is not allowed"),
    ("CHECKPOINT", "CHECKPOINT (a statement of type CALL) is not allowed"),
    ("CREATE TABLE t AS SELECT * FROM tokens", "CREATE is not allowed"),
    ("CREATE VIEW v AS SELECT 1", "CREATE is not allowed"),
    ("CREATE SECRET (TYPE s3)", "CREATE is not allowed"),
    ("INSERT INTO tokens VALUES (1)", "INSERT is not allowed"),
    ("WITH x AS (SELECT 1) INSERT INTO tokens SELECT * FROM x",
     "WITH (a statement of type INSERT) is not allowed"),
    ("DROP VIEW tokens", "DROP is not allowed"),
    ("EXPLAIN SELECT 1", "EXPLAIN is not allowed"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/explained.csv'", "EXPLAIN is not allowed"),
    ("PIVOT tokens ON pos USING count(*)", "PIVOT without an IN list is not allowed"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}/multi.csv'", "COPY is not allowed"),
    ("SELECT * FROM tokens; DROP VIEW tokens", "DROP is not allowed"),
    ("", "holds no statement"),
    ("-- only a comment", "holds no statement"),
]
ESCAPES = [(sql, "reads only the run tables") for sql in READS] + STATEMENTS


@pytest.mark.parametrize("via", ["python", "cli"])
@pytest.mark.parametrize("sql, message", ESCAPES)
def test_escapes_are_refused(world, capsys, via, sql, message):
    sql = sql.format(**world)
    before = snapshot(world["tmp"])
    if via == "python":
        with pytest.raises(QueryError, match=re.escape(message)):
            query(sql, [world["a"], world["b"]])
    else:
        assert main(["query", sql, world["a"], world["b"]]) == EXIT_USAGE
        out, err = capsys.readouterr()
        assert out == "" and message in err
        assert err.startswith("tokenprobe: error: ") and err.count("\n") == 1, err
    assert snapshot(world["tmp"]) == before  # nothing created, nothing overwritten
    assert "hunter2" not in capsys.readouterr().out


def test_cli_refuses_a_run_whose_run_json_names_a_path(world, tmp_path, capsys):
    meta = json.loads((Path(world["a"]) / "run.json").read_text())
    (tmp_path / "outside" / "prompts.parquet").write_bytes(
        (tmp_path / "outside" / "secret.parquet").read_bytes())
    meta["tables"] = ["../../outside/prompts"]
    (Path(world["a"]) / "run.json").write_text(json.dumps(meta))
    assert main(["query", "SELECT * FROM prompts", world["a"]]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert "hunter2" not in out and "never a path" in err and err.count("\n") == 1
