"""SQL over one or many run directories with DuckDB: each table is a view with a `run` column.

Sandboxed, because SQL can name files: only read-only statements run (SELECT, including
WITH ... SELECT, VALUES, DESCRIBE, SHOW and SUMMARIZE; not EXPLAIN, which with ANALYZE runs its
statement, nor a PIVOT without an IN list, which DuckDB runs as several statements). Before any
of the caller's SQL the connection is set to `enable_external_access=false` with
`allowed_paths` exactly the run tables' Parquet files (every part file), extension autoloading and autoinstalling
off, and `lock_configuration=true`, so that no statement reads another file, loads an extension
or changes those settings. The statement filter is what keeps the allowed files from being
written (a COPY to one of them would pass DuckDB's path check).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pandas as pd

from tokenprobe.store import RunNotFoundError, is_complete, table_files

READ_ONLY = "tokenprobe query runs read-only SELECT statements over the run tables"
ALLOWED = (duckdb.StatementType.SELECT,)
COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


class QueryError(ValueError):
    """SQL that is refused: a statement other than a read-only SELECT, or one that reaches for a
    file other than the run tables. The message says which; the CLI exits 2."""


class RunConnection:
    """A sandboxed DuckDB connection with one view per run table (made by `connect`).

    `query` runs read-only SQL and returns a DataFrame; `tables` lists the views. The DuckDB
    connection itself is not handed out, since its `execute` would run any statement.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, tables: list[str]) -> None:
        self._con = con
        self.tables = tables

    def query(self, sql: str, parameters: list | dict | None = None) -> pd.DataFrame:
        """The result of the last statement of `sql` (see `check_sql`).

        Raises:
            QueryError: a statement is not a read-only SELECT, or names a file that is not a
                run table.
            duckdb.Error: any other SQL error (syntax, unknown column, ...).
        """
        check_sql(sql)
        try:
            return self._con.execute(sql, parameters).df()
        except duckdb.PermissionException as err:
            detail = str(err).splitlines()[0]
            raise QueryError(f"tokenprobe query reads only the run tables "
                             f"({', '.join(self.tables)}), no other file; {detail}") from err

    def register(self, name: str, frame: pd.DataFrame) -> None:
        """Add the caller's `frame` as a view `name` (e.g. labels to join on `run`)."""
        self._con.register(name, frame)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> RunConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_sql(sql: str) -> None:
    """Raise QueryError unless `sql` holds at least one statement and every one is a SELECT.

    Raises:
        QueryError: no statement, or a statement of another kind (COPY, ATTACH, INSTALL, LOAD,
            SET, PRAGMA, CREATE, INSERT, DROP, EXPLAIN, CALL, ...); nothing has run.
        duckdb.ParserException: `sql` does not parse.
    """
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise QueryError(f"{READ_ONLY}; the SQL given holds no statement")
    for statement in statements:
        if statement.type in ALLOWED:
            continue
        if statement.type == duckdb.StatementType.MULTI:
            raise QueryError(f"{READ_ONLY}; a PIVOT without an IN list is not allowed (DuckDB "
                             "runs it as several statements): list the values, PIVOT t ON col "
                             "IN (...)")
        raise QueryError(f"{READ_ONLY}; {_kind(statement)} is not allowed")


def _kind(statement: duckdb.Statement) -> str:
    """How to name a refused statement: its first keyword, and its type when that differs."""
    words = re.findall(r"[A-Za-z_]+", COMMENTS.sub(" ", statement.query))
    word, kind = (words[0].upper() if words else "?"), statement.type.name
    return word if word == kind or kind == "LOAD" else f"{word} (a statement of type {kind})"


def connect(run_dirs: list[str | os.PathLike]) -> RunConnection:
    """A sandboxed in-memory DuckDB connection with one view per table over all `run_dirs`.

    A view's rows carry `run` (the directory as given) before the table's own columns;
    tables missing from some runs hold only the runs that have them (columns unioned by name).
    The tables are those each run.json lists, checked by `tokenprobe.store.table_files`; they
    are the only files the connection can open (see the module docstring).

    Raises:
        RunNotFoundError: a directory holds no complete run (InvalidRunError: its run.json
            lists an unsafe table name or file).
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    by_table: dict[str, list[tuple[str, list[Path]]]] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not is_complete(path):
            raise RunNotFoundError(f"{path} is not a complete tokenprobe run")
        for table, files in table_files(path).items():
            by_table.setdefault(table, []).append((str(run_dir), files))
    con = duckdb.connect(config={"autoload_known_extensions": False,
                                 "autoinstall_known_extensions": False})
    try:
        for table, sources in sorted(by_table.items()):
            selects = " UNION ALL BY NAME ".join(
                f"SELECT {_literal(run)} AS run, * FROM read_parquet([{_literals(files)}], "
                "union_by_name = true)" for run, files in sources)
            con.execute(f'CREATE VIEW "{table}" AS {selects}')
        files = sorted({str(f) for sources in by_table.values() for _, found in sources
                        for f in found})
        # In this order: allowed_paths cannot change once external access is off.
        con.execute("SET allowed_paths = ?", [files])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return RunConnection(con, sorted(by_table))


def query(sql: str, run_dirs: list[str | os.PathLike]) -> pd.DataFrame:
    """Run read-only `sql` over the tables of `run_dirs` (see `connect`); return the result.

    Raises:
        QueryError: `sql` is not read-only SELECTs over the run tables (see `check_sql`).
        duckdb.Error: any other SQL error.
        RunNotFoundError: a directory is not a complete, valid run.
    """
    with connect(run_dirs) as con:
        return con.query(sql)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _literals(files: list[Path]) -> str:
    return ", ".join(_literal(str(f)) for f in files)
