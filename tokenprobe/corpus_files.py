"""The corpus' file readers: the records (where, text, id) of one .txt, .jsonl, .csv or
.parquet file or `datasets` folder, read lazily, with errors naming the file and line or
record. `tokenprobe.corpus.Corpus` resolves the sources and numbers the prompts."""
from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

TEXT_COLUMNS = ("text", "prompt", "messages")  # tried in order when no text_column is named
ID_COLUMN = "id"  # the id column used where a source has it, when no id_column is named
RESPONSE_COLUMN = "response"  # the response column used where present, when none is named
BATCH_ROWS = 1024  # rows per Parquet / Arrow batch
RESAVE = "save the dataset again with save_to_disk"
# (where: FILE:LINE, FILE record N or texts[i]; the text, or chat messages as (role, content)
# pairs; the id; the response)
_Record = tuple[str, "str | tuple[tuple[str, str], ...]", "str | None", "str | None"]


@dataclass(frozen=True)
class Columns:
    """The columns (JSON keys) a corpus reads: the text (None: the first of TEXT_COLUMNS a
    source has), the id and the response (None: ID_COLUMN / RESPONSE_COLUMN where present)."""
    text: str | None = None
    id: str | None = None
    response: str | None = None


class CorpusError(ValueError):
    """A corpus that cannot be read as given: the message names the file (and line/record) and
    what to do."""


@dataclass(frozen=True)
class _Source:
    """A resolved source: a prompt file (`kind` its suffix) or a `datasets` folder ("dataset");
    `files` are what `Corpus.describe` lists (the file, or state.json and its Arrow files)."""
    path: Path
    kind: str
    files: tuple[Path, ...]


def _splits_error(path: Path) -> CorpusError:
    """The error for a DatasetDict folder: point at one of its splits."""
    splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
    return CorpusError(f"{path} is a datasets DatasetDict (splits: {_names(splits)}); point at "
                       "one split, DIR/<split>")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text with its line end) for each line of a file, read one at a time;
    a leading UTF-8 byte order mark is dropped."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise CorpusError(f"cannot read prompt file {path}: {err.strerror}") from err
    with handle:
        offset = 0
        for number, raw in enumerate(handle, 1):
            skip = 3 if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as err:
                at = skip + err.start
                raise CorpusError(f"prompt file {path} is not UTF-8 (line {number}, byte "
                                  f"{offset + at}: {raw[at:at + 1]!r}); re-encode it as UTF-8"
                                  ) from None
            offset += len(raw)
            yield number, line


def _read_txt(source: _Source, cols: Columns) -> Iterator[_Record]:
    """A prompt per non-blank line (lines split as str.splitlines does)."""
    for named, kind in ((cols.id, "id"), (cols.response, "response")):
        if named is not None:
            raise CorpusError(f'{source.path}: a .txt file has no "{named}" {kind} column (no '
                              "columns at all); give that source as .jsonl or .csv, or no "
                              f"{kind}_column")
    for number, line in _lines(source.path):
        for piece in line.splitlines():
            if piece.strip():
                yield f"{source.path}:{number}", piece, None, None


def _read_jsonl(source: _Source, cols: Columns) -> Iterator[_Record]:
    """A prompt per non-blank line: a JSON string, or an object with the text or chat
    messages (and id, response)."""
    for number, line in _lines(source.path):
        if line.strip():
            where = f"{source.path}:{number}"
            try:
                item = json.loads(line)
            except ValueError as err:
                raise CorpusError(f"{where}: not valid JSON ({err})") from err
            yield _json_record(where, item, cols)


def _json_record(where: str, item: Any, cols: Columns) -> _Record:
    """The record of one JSON Lines value."""
    column, id_col = cols.text, cols.id
    wanted = f'"{column}"' if column else " or ".join(f'"{c}"' for c in TEXT_COLUMNS)
    if isinstance(item, str):
        for named, kind in ((id_col, "id"), (cols.response, "response")):
            if named is not None:
                raise CorpusError(f'{where}: a JSON string has no "{named}" {kind}; give '
                                  f"objects with that key, or no {kind}_column")
        return where, item, None, None
    if not isinstance(item, dict):
        raise CorpusError(f"{where}: expected a string or an object with {wanted}")
    key = column or next((c for c in TEXT_COLUMNS if c in item), None)
    if key not in item:
        raise CorpusError(f"{where}: the object has no {wanted} key (its keys: "
                          f"{_names(item)}); name the text key with text_column (--text-column)")
    for named, kind in ((id_col, "id"), (cols.response, "response")):
        if named is not None and named not in item:
            raise CorpusError(f'{where}: the object has no "{named}" {kind} key (its keys: '
                              f"{_names(item)}); give every record one, or another {kind}_column")
    response = item.get(cols.response or RESPONSE_COLUMN)
    return (where, _text(where, item[key], key), _doc(item.get(id_col or ID_COLUMN)),
            None if response is None else _text(where, response, cols.response or
                                                RESPONSE_COLUMN))


def _read_csv(source: _Source, cols: Columns) -> Iterator[_Record]:
    """A prompt per CSV row after the header (blank lines skipped; an empty id cell: no id)."""
    path, lines = source.path, _lines(source.path)
    reader = csv.reader((line for _, line in lines), strict=True)
    with contextlib.closing(lines):
        try:
            header = next(reader, None)
            if header is None:
                return
            picked = _pick(header, cols, path)
            at = [header.index(c) if c else None for c in picked]
            start = reader.line_num + 1
            for row in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if row and len(row) <= max(i for i in at if i is not None):
                    raise CorpusError(f"{where}: the row has {len(row)} fields, the header "
                                      f"{len(header)}; give every row the header's fields")
                if row:
                    ident, response = ((row[i] or None) if i is not None else None
                                       for i in at[1:])
                    yield where, _text(where, row[at[0]], picked[0]), ident, response
        except csv.Error as err:
            raise CorpusError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err


def _read_parquet(source: _Source, cols: Columns) -> Iterator[_Record]:
    """A prompt per Parquet row, read BATCH_ROWS rows (of the columns used) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(source.path) as handle:
            picked = _pick(handle.schema_arrow.names, cols, source.path)
            batches = handle.iter_batches(batch_size=BATCH_ROWS, columns=_used(picked))
            yield from _batch_records(source.path, batches, picked)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{source.path} is not a readable Parquet file ({err})") from err


def _read_dataset(source: _Source, cols: Columns) -> Iterator[_Record]:
    """A prompt per row of a `save_to_disk` folder: through `datasets.load_from_disk`
    (memory-mapped, read in batches) where `datasets` is installed, else `_read_arrow`."""
    try:
        import datasets
    except ImportError:
        yield from _read_arrow(source, cols)
        return
    try:
        data = datasets.load_from_disk(str(source.path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorpusError(f"cannot load the dataset {source.path} ({err}); {RESAVE}") from err
    if not isinstance(data, datasets.Dataset):
        raise _splits_error(source.path)
    picked = _pick(data.column_names, cols, source.path)
    batches = data.select_columns(_used(picked)).with_format("arrow")
    yield from _batch_records(source.path, batches.iter(batch_size=BATCH_ROWS), picked)


def _read_arrow(source: _Source, cols: Columns) -> Iterator[_Record]:
    """The rows of the Arrow stream files a `save_to_disk` state.json lists, a record batch
    at a time (pyarrow only)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    numbers = itertools.count(1)
    try:
        for file in source.files[1:]:
            with pa.OSFile(str(file)) as handle:
                stream = ipc.open_stream(handle)
                picked = _pick(stream.schema.names, cols, source.path)
                yield from _batch_records(source.path, stream, picked, numbers)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{source.path} holds an unreadable Arrow file ({err}); {RESAVE}"
                          ) from err


def _batch_records(path: Path, batches: Iterable[Any], picked: tuple[str, str | None, str | None],
                   numbers: Iterator[int] | None = None) -> Iterator[_Record]:
    """The records of Arrow record batches (or tables) with the columns `picked` (text, id,
    response; `_pick`), numbered by `numbers` (from 1)."""
    numbers = numbers or itertools.count(1)
    text, ident, response = picked
    for batch in batches:
        texts = batch.column(text).to_pylist()
        ids = batch.column(ident).to_pylist() if ident else [None] * len(texts)
        answers = batch.column(response).to_pylist() if response else [None] * len(texts)
        for value, doc, answer in zip(texts, ids, answers):
            where = f"{path} record {next(numbers)}"
            yield (where, _text(where, value, text), _doc(doc),
                   None if answer is None else _text(where, answer, response))


def _pick(names: Sequence[str], cols: Columns, where: Path
          ) -> tuple[str, str | None, str | None]:
    """The text column, the id column and the response column (None: none) of a source with
    columns `names`."""
    column, id_col = cols.text, cols.id
    text = column or next((c for c in TEXT_COLUMNS if c in names), None)
    if text not in names:
        wanted = f'"{column}"' if column else " or ".join(f'"{c}"' for c in TEXT_COLUMNS)
        raise CorpusError(f"{where} has no {wanted} column (its columns: {_names(names)}); "
                          "name the text column with text_column (--text-column)")
    if id_col is not None and id_col not in names:
        raise CorpusError(f'{where} has no "{id_col}" id column (its columns: '
                          f"{_names(names)}); name another with id_column (--id-column)")
    if cols.response is not None and cols.response not in names:
        raise CorpusError(f'{where} has no "{cols.response}" response column (its columns: '
                          f"{_names(names)}); name another with response_column "
                          "(--response-column)")
    ident, response = id_col or ID_COLUMN, cols.response or RESPONSE_COLUMN
    return (text, ident if ident in names else None,
            response if response in names and response != text else None)


def _used(picked: tuple[str, str | None, str | None]) -> list[str]:
    """The columns to read: the text, id and response columns (each once)."""
    return list(dict.fromkeys(c for c in picked if c))


def _names(names: Iterable[Any], most: int = 20) -> str:
    """Column, key or split names for a message, the first `most` of them."""
    names = [str(n) for n in names]
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return (", ".join(names[:most]) or "none") + more


def _text(where: str, value: Any, column: str) -> str | tuple[tuple[str, str], ...]:
    """`value` if it is a string, chat messages (a list of {"role", "content"} objects) as
    (role, content) pairs, else CorpusError naming the record."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        return _messages(where, value, column)
    what = "null" if value is None else f"of type {type(value).__name__}"
    raise CorpusError(f'{where}: the "{column}" value is {what}, not text; give every record a '
                      "string there")


def _messages(where: str, value: Any, column: str) -> tuple[tuple[str, str], ...]:
    """Chat messages as (role, content) pairs; CorpusError unless each is an object with a
    string role and content."""
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise CorpusError(f'{where}: "{column}" item {i} is not a chat message; give '
                              'a list of {"role": ..., "content": ...} objects with strings')
        out.append((message["role"], message["content"]))
    return tuple(out)


def _doc(value: Any) -> str | None:
    """A record's doc_id: its id value as a string, None where it has none."""
    return None if value is None else str(value)
