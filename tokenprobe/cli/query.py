"""`tokenprobe models`, `tokenprobe tables` and `tokenprobe query`: the subcommands that only
read (the model registry, the table declarations, run directories)."""
from __future__ import annotations

import argparse
import sys

from tokenprobe.cli.args import EXIT_OK, UsageError, positive_int


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `models` subcommand to `subparsers`; its handler is `cmd_models`."""
    models = subparsers.add_parser(
        "models", help="list registered models and whether weights are present",
        description="List registered models: layers, heads, width, vocab, context, and whether "
                    "weights are cached.")
    models.set_defaults(func=cmd_models)
    return models


def cmd_models(args: argparse.Namespace) -> int:
    from tokenprobe.models import REGISTRY, describe

    rows = [describe(name) for name in REGISTRY]
    cols = ["name", "layers", "heads", "kv_heads", "width", "vocab", "context", "weights"]
    table = [[str(r.get(c, "?")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    return EXIT_OK


def add_tables_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `tables` subcommand to `subparsers`; its handler is `cmd_tables`."""
    tables = subparsers.add_parser(
        "tables", help="the tables a run can hold: grain, keys, every column's type and meaning",
        description="Describe the tables that tokenprobe's probes and studies write: what one "
                    "row is, the keys, and per column its dtype, what it holds (unit, source) "
                    "and, in brackets, the probe or study that writes it.")
    tables.add_argument("names", nargs="*", metavar="TABLE", help="only these tables")
    tables.set_defaults(func=cmd_tables)
    return tables


def cmd_tables(args: argparse.Namespace) -> int:
    import tokenprobe.analyses.attribution  # noqa: F401  (each study declares its tables)
    import tokenprobe.analyses.counterfactual  # noqa: F401
    import tokenprobe.analyses.critical  # noqa: F401
    import tokenprobe.analyses.spans  # noqa: F401
    from tokenprobe.probe import registry
    from tokenprobe.tables import TABLES, describe

    registry()
    unknown = [n for n in args.names if n not in TABLES]
    if unknown:
        raise UsageError(f"no table {unknown[0]!r}; tables: {', '.join(TABLES)}")
    print(describe(args.names or None))
    return EXIT_OK


def add_query_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `query` subcommand to `subparsers`; its handler is `cmd_query`."""
    query = subparsers.add_parser(
        "query", help="SQL over run directories (DuckDB)",
        description="Run DuckDB SQL over one or more run dirs. Each table (prompts, tokens, "
                    "token_layers, massive, ...) is a view with a leading `run` column. Read-only "
                    "and sandboxed: only SELECT statements (WITH, VALUES, DESCRIBE, SHOW, "
                    "SUMMARIZE too; not EXPLAIN), and no file but the run tables can be read.",
        epilog='example: tokenprobe query "SELECT run, layer, max(value) FROM massive GROUP BY '
               'ALL" runs/a runs/b')
    query.add_argument("sql")
    query.add_argument("runs", nargs="+", metavar="RUN_DIR")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table",
                       help="table (default) and csv print control characters in text as "
                            "escapes (\\n, \\x1b, ...); json escapes them as JSON does, "
                            "exactly")
    query.add_argument("--max-rows", type=positive_int, default=60,
                       help="rows shown in table format (default 60)")
    query.set_defaults(func=cmd_query)
    return query


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from tokenprobe.query import QueryError, query

    try:
        frame = query(args.sql, args.runs)
    except QueryError as err:
        raise UsageError(str(err)) from err
    except duckdb.Error as err:
        raise UsageError(f"SQL error: {err}") from err
    if args.format == "json":  # JSON escapes control characters itself (and all non-ASCII)
        print(frame.to_json(orient="records", indent=1))
        return EXIT_OK
    frame = printable(frame)
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        print(quoted_tokens(frame).to_string(index=False, max_rows=args.max_rows))
    return EXIT_OK


def quoted_tokens(frame):
    """`frame` with the token text of its token columns (`token`, `*_token`, `token_raw`) in
    quotes, so that a leading space or a whitespace token shows in a table: ' the', ' '."""
    out = frame.copy()
    for column in out.columns:
        if column in ("token", "token_raw") or str(column).endswith("_token"):
            out[column] = out[column].map(lambda v: f"'{v}'" if isinstance(v, str) else v)
    return out


def printable(frame):
    """`frame` with control characters in its text cells and column names escaped
    (`tokens.display_text`), so that printing it never drives the terminal."""
    from tokenprobe.tokens import display_text

    def escape(value):
        if isinstance(value, str):
            return display_text(value)
        if isinstance(value, bytes):
            return display_text(value.decode("utf-8", errors="backslashreplace"))
        return value

    import pandas as pd

    out = frame.rename(columns=lambda c: display_text(str(c)))
    for column in out.columns[[dtype == object or pd.api.types.is_string_dtype(dtype)
                               for dtype in out.dtypes]]:
        out[column] = out[column].map(escape)
    return out
