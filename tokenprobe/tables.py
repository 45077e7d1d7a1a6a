"""Table declarations: one grain per table, declared keys, and per column a dtype and what it is.

Whoever writes a table declares it next to the reduction that fills it: a probe in its class
(`Probe.tables`, registered with the probe), a study (critical tokens, attribution,
counterfactuals) in its module, and the core here the tables every run has: `prompts` and
`tokens` (the text and its tokenisation), `token_layers` (the keys of per-layer, per-token
statistics that probes add columns to) and `nonfinite` (where a statistic was NaN or inf).
`describe()` prints every declared table; `tokenprobe tables` shows it.

A shared table's columns stand in declaration order: the core's first, then each writer's in
the order it was declared (the built-in probes: activations, sinks, entropy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Column:
    """A declared column: pandas dtype and one line of what it holds (unit, source)."""

    dtype: str
    doc: str


@dataclass
class Table:
    """A declared table: its grain (what one row is), keys, and columns by writer."""

    grain: str
    keys: tuple[str, ...]
    columns: dict[str, Column]
    writers: dict[str, str] = field(default_factory=dict)  # column -> who declared it
    owner: str = ""  # who declared the table


TABLES: dict[str, Table] = {}
SCHEMAS: dict[str, dict[str, str]] = {}  # table -> column -> dtype, kept in step with TABLES
KEYS: dict[str, list[str]] = {}


def declare(writer: str, tables: Mapping[str, Table | Mapping[str, Column]]) -> None:
    """Declare `writer`'s tables: a `Table` is a new table (its keys among its columns), a
    mapping of columns adds them to a table already declared. Declaring the same columns again
    for the same writer is a no-op (a module reloaded); a column another writer owns, or a
    table that does not exist yet, raises ValueError."""
    for name, spec in tables.items():
        if isinstance(spec, Table):
            if name in TABLES and TABLES[name].keys != spec.keys:
                raise ValueError(f"table {name!r} is already declared with keys "
                                 f"{TABLES[name].keys}")
            TABLES.setdefault(name, Table(spec.grain, spec.keys, {}, owner=writer))
            columns = spec.columns
        elif name not in TABLES:
            raise ValueError(f"{writer} adds columns to table {name!r}, which nobody declared; "
                             f"declared: {', '.join(TABLES)}")
        else:
            columns = spec
        table = TABLES[name]
        for column, declared in columns.items():
            owner = table.writers.get(column)
            if owner is not None and owner != writer and column not in table.keys:
                raise ValueError(f"column {name}.{column} is declared by {owner} and {writer}")
            table.columns[column] = declared
            table.writers.setdefault(column, writer)
        SCHEMAS[name] = {c: col.dtype for c, col in table.columns.items()}
        KEYS[name] = list(table.keys)


def withdraw(writer: str) -> None:
    """Remove what `writer` declared: its tables, and the columns it added to others."""
    for name in list(TABLES):
        table = TABLES[name]
        if table.owner == writer:
            del TABLES[name], SCHEMAS[name], KEYS[name]
            continue
        for column in [c for c, w in table.writers.items() if w == writer]:
            del table.columns[column], table.writers[column]
        SCHEMAS[name] = {c: col.dtype for c, col in table.columns.items()}


def writer_of(table: str, column: str) -> str | None:
    """Who declared `table.column` (a probe's name, a study's, or "core"); None if nobody."""
    found = TABLES.get(table)
    return found.writers.get(column) if found else None


def describe(names: list[str] | None = None) -> str:
    """Every declared table (or those named) as text: grain, keys, then one line a column."""
    out = []
    for name in names or list(TABLES):
        table = TABLES[name]
        out.append(f"{name} (grain: {table.grain}; keys: {', '.join(table.keys)})")
        for column, spec in table.columns.items():
            owner = table.writers[column]
            out.append(f"    {column:<18} {spec.dtype:<8} {spec.doc}"
                       + ("" if owner == "core" or column in table.keys else f"  [{owner}]"))
    return "\n".join(out)


C = Column
declare("core", {
    "prompts": Table("prompt", ("prompt_id",), {
        "prompt_id": C("int64", "0-based index of the prompt in the run"),
        "text": C("string", "the prompt as given"),
        "n_tokens": C("int64", "tokens after tokenisation (and truncation)"),
        "truncated": C("bool", "the prompt was cut (to max_tokens / --max-tokens, or to the "
                               "model's context with truncate / --truncate)"),
        "first_is_special": C("bool", "position 0 is a special token (e.g. Gemma's <bos>; "
                                      "SmolLM2 adds none)"),
        "doc_id": C("string", "the document's id in a corpus read from files (its id column, "
                              "--id-column, default `id`; NA when it has none)"),
        "response_start": C("Int64", "position of the response's first token (a prompt given "
                                     "with a response, or chat messages ending with the "
                                     "assistant's); NA without one"),
    }),
    "tokens": Table("prompt x position", ("prompt_id", "pos"), {
        "prompt_id": C("int64", "key"),
        "pos": C("int64", "key; 0-based over real tokens (padding never appears)"),
        "token_id": C("int64", "vocabulary id"),
        "token": C("string", "the token's readable text, safe to print: control and format "
                             "characters escaped (\\n, \\t, \\xNN, \\uNNNN); a piece that is "
                             "not whole UTF-8 characters reads as its bytes (\\xNN)"),
        "token_raw": C("string", "the token's exact text (the same \\xNN bytes for partial "
                                 "UTF-8 pieces)"),
        "is_special": C("bool", "the id is one of the tokenizer's special ids"),
        "in_response": C("boolean", "the token is part of the prompt's response; NA when the "
                                    "prompt has none"),
    }),
    "token_layers": Table("prompt x layer x position; the residual after block `layer`, "
                          "0-based", ("prompt_id", "layer", "pos"), {
        "prompt_id": C("int64", "key"), "layer": C("int64", "key: the block, 0-based"),
        "pos": C("int64", "key"),
    }),
    "nonfinite": Table("prompt x layer x probe x site; only where a reduced statistic is NaN "
                       "or +-inf (the model's numbers overflowed, e.g. float16, or were NaN)",
                       ("prompt_id", "layer", "probe", "site"), {
        "prompt_id": C("int64", "key"),
        "layer": C("int64", "key: the block whose output or attention was reduced (site "
                            "logits: the last block)"),
        "probe": C("string", "the probe that found it"),
        "site": C("string", "resid_post (residual after the block), attention (that block's "
                            "attention statistics), logits (the next-token distribution), lens "
                            "(the logit lens at that layer)"),
        "n_checked": C("int64", "positions (heads, for site attention) checked"),
        "n_nonfinite": C("int64", "of them, those with a NaN or +-inf statistic"),
        "first_index": C("int64", "the first such position (or head)"),
        "n_nan": C("int64", "NaN values among the statistics"),
        "n_inf": C("int64", "+-inf values among the statistics"),
        "statistics": C("string", "the statistics that were non-finite, comma-separated"),
    }),
})
del C


def conform(name: str, frame: pd.DataFrame | None) -> pd.DataFrame:
    """Return `frame` with declared columns of table `name`, in declared order and dtypes.

    A table may hold a subset of its declared columns (tables such as `token_layers` gain
    columns from several probes) but always all of its keys. None gives an empty table with
    every column. Undeclared columns or missing keys raise ValueError.
    """
    schema = SCHEMAS[name]
    if frame is None:
        if name not in _EMPTY:
            _EMPTY[name] = pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})
        return _EMPTY[name].copy(deep=False)
    extra = set(frame.columns) - set(schema)
    missing = set(KEYS[name]) - set(frame.columns)
    if extra or missing:
        raise ValueError(f"table {name!r}: undeclared columns {sorted(extra)}, missing keys "
                         f"{sorted(missing)} (declared: {list(schema)})")
    columns = [c for c in schema if c in frame.columns]
    out = frame.copy(deep=False) if list(frame.columns) == columns else frame[columns]
    have = out.dtypes
    wrong = {c: schema[c] for c in columns if have[c] != _dtype(schema[c])}
    return out.astype(wrong) if wrong else out  # a table conformed once is not copied again


_DTYPES: dict[str, object] = {}
_EMPTY: dict[str, pd.DataFrame] = {}  # each table's empty frame, made once


def _dtype(name: str):
    """The pandas dtype a schema names (cached: conform runs for every table of a batch)."""
    if name not in _DTYPES:
        _DTYPES[name] = pd.api.types.pandas_dtype(name)
    return _DTYPES[name]


def join(name: str, left: pd.DataFrame | None, right: pd.DataFrame) -> pd.DataFrame:
    """Combine two probes' parts of the same table on its keys (outer join)."""
    if left is None:
        return right
    if "probe" in KEYS[name]:  # each probe writes its own rows (nonfinite): stack them
        return conform(name, pd.concat([left, right], ignore_index=True))
    shared = (set(left.columns) & set(right.columns)) - set(KEYS[name])
    if shared:
        raise ValueError(f"table {name!r}: columns {sorted(shared)} written by two probes")
    if not len(left) or not len(right):  # e.g. an empty `massive`
        return conform(name, pd.concat([left, right], ignore_index=True))
    keys = KEYS[name]
    if len(left) == len(right) and all(  # the same rows in the same order: side by side
            np.array_equal(left[k].to_numpy(), right[k].to_numpy()) for k in keys):
        return conform(name, pd.concat([left.reset_index(drop=True),
                                        right.drop(columns=keys).reset_index(drop=True)], axis=1))
    return conform(name, left.merge(right, on=keys, how="outer"))


def merge_parts(name: str, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-batch parts of table `name`, sorted by its keys."""
    frames = [p for p in parts if p is not None and len(p)]
    if not frames:
        return conform(name, None)
    out = pd.concat(frames, ignore_index=True)
    return conform(name, out).sort_values(KEYS[name], kind="stable", ignore_index=True)
