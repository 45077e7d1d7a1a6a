"""SQL over one or many run directories with DuckDB: each table is a view with a `run` column."""
from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pandas as pd

from tokenprobe.store import RunNotFoundError, is_complete


def connect(run_dirs: list[str | os.PathLike]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table over all `run_dirs`.

    A view's rows carry `run` (the directory as given) before the table's own columns;
    tables missing from some runs hold only the runs that have them (columns unioned by name).
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    by_table: dict[str, list[tuple[str, Path]]] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not is_complete(path):
            raise RunNotFoundError(f"{path} is not a complete tokenprobe run")
        for file in sorted(path.glob("*.parquet")):
            by_table.setdefault(file.stem, []).append((str(run_dir), file))
    con = duckdb.connect()
    for table, sources in by_table.items():
        selects = " UNION ALL BY NAME ".join(
            f"SELECT {_literal(run)} AS run, * FROM read_parquet({_literal(str(file))})"
            for run, file in sources)
        con.execute(f'CREATE VIEW "{table}" AS {selects}')
    return con


def query(sql: str, run_dirs: list[str | os.PathLike]) -> pd.DataFrame:
    """Run `sql` over the tables of `run_dirs` (see `connect`) and return the result."""
    with connect(run_dirs) as con:
        return con.execute(sql).df()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
