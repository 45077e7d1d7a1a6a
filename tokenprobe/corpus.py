"""Prompts read lazily from texts and .txt/.jsonl/.csv/.parquet files, folders, globs, datasets."""
from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
TEXT_COLUMNS = ("text", "prompt")  # tried in order when no text_column is named
ID_COLUMN = "id"  # the id column used where a source has it, when no id_column is named
BATCH_ROWS = 1024  # rows per Parquet / Arrow batch
ACCEPTED = ("a .txt, .jsonl, .csv or .parquet file, a folder of them, a glob pattern, or a "
            "folder written by datasets' save_to_disk")
RESAVE = "save the dataset again with save_to_disk"
SHARD_FORM = "a shard is I/N with 0 <= I < N (e.g. 0/4 to 3/4)"

_Record = tuple[str, str, "str | None"]  # (where: FILE:LINE, FILE record N or texts[i], text, id)


class CorpusError(ValueError):
    """A corpus that cannot be read as given: the message names the file (and line/record) and
    what to do."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a corpus.

    Attributes:
        prompt_id: 0-based position in the whole corpus (before shard and limit selection).
        text: the prompt's text.
        doc_id: the record's id column as a string; None when the source has none.
    """
    prompt_id: int
    text: str
    doc_id: str | None


@dataclass(frozen=True)
class _Source:
    """A resolved source: a prompt file (`kind` its suffix) or a `datasets` folder ("dataset");
    `files` are what `Corpus.describe` lists (the file, or state.json and its Arrow files)."""
    path: Path
    kind: str
    files: tuple[Path, ...]


class Corpus:
    """The prompts of `texts`, then of each source in order, read only as they are iterated.

    A source is a .txt file (a prompt per non-blank line), .jsonl (a JSON string or object per
    line), .csv or .parquet (a text column), a folder (its files of those kinds by name, not
    recursive, hidden and other files ignored), a folder saved by `datasets`' `save_to_disk`,
    or a glob pattern (its matches sorted). The text is `text_column`, else "text", else
    "prompt" (a .txt has no columns); `id_column` (default "id", used where present) gives
    `doc_id`. `shard=(i, n)` keeps the prompts whose id is i modulo n, `limit` the first of
    those (reading stops there). Every record read is checked, other shards' too, so each shard
    of a bad corpus fails alike.

    Raises:
        ValueError: no texts and no sources, a limit below 1 or a bad shard.
        TypeError: `sources` or `texts` is one string, or holds what is not a path / a str.
    """

    def __init__(self, sources: Sequence[str | os.PathLike] = (), texts: Sequence[str] = (), *,
                 text_column: str | None = None, id_column: str | None = None,
                 limit: int | None = None, shard: tuple[int, int] | None = None) -> None:
        if isinstance(sources, (str, bytes, os.PathLike)) or isinstance(texts, (str, bytes)):
            raise TypeError("sources and texts are sequences; wrap a single one in a list")
        self.sources, self.texts = tuple(sources), tuple(texts)
        if not all(isinstance(s, (str, os.PathLike)) for s in self.sources) \
                or not all(isinstance(t, str) for t in self.texts):
            raise TypeError("each source is a path (str or os.PathLike), each text a str")
        if not self.sources and not self.texts:
            raise ValueError("no prompts given")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        self.text_column, self.id_column, self.limit = text_column, id_column, limit
        self.shard = None if shard is None else _check_shard(shard, repr(shard))

    def __iter__(self) -> Iterator[Prompt]:
        """The selected prompts in corpus order.

        Raises:
            CorpusError: a source cannot be read as given, or nothing is selected.
            tokenprobe.tokens.PromptError: a prompt is empty or whitespace only.
        """
        sources = self._resolve()
        seen = kept = 0
        with contextlib.closing(self._records(sources)) as records:
            for prompt_id, (where, text, doc_id) in enumerate(records):
                seen += 1
                _check_text(prompt_id, where, text)
                if self.shard is None or prompt_id % self.shard[1] == self.shard[0]:
                    yield Prompt(prompt_id, text, doc_id)
                    kept += 1
                    if kept == self.limit:
                        return
        if not kept:
            raise CorpusError(self._nothing_left(seen, sources))

    def check(self) -> None:
        """Fail now, not mid-run: every source exists and its first record reads (a known
        kind, readable, its format, the text column and a named id column); texts all checked.

        Raises:
            CorpusError: as iteration would on a source's first record, or no prompt at all.
            tokenprobe.tokens.PromptError: a given text is empty or whitespace only.
        """
        for i, text in enumerate(self.texts):
            _check_text(i, f"texts[{i}]", text)
        sources = self._resolve()
        found = bool(self.texts)
        for source in sources:
            with contextlib.closing(self._reader(source)) as reader:
                found = next(reader, None) is not None or found
        if not found:
            raise CorpusError(self._nothing_left(0, sources))

    def describe(self) -> dict:
        """What identifies the corpus for resume, JSON-able: the texts' SHA-256 (each text's
        UTF-8 length, then its bytes), every resolved file's absolute path, size and mtime_ns,
        the columns, limit and shard. Reads no file (but a dataset's state.json).

        Raises:
            CorpusError: a source does not exist or is of an unknown kind.
        """
        digest = hashlib.sha256()
        for text in self.texts:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big") + data)
        files = [(file, file.stat()) for source in self._resolve() for file in source.files]
        return {"texts_sha256": digest.hexdigest(),
                "sources": [{"path": str(file.resolve()), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns} for file, st in files],
                "text_column": self.text_column, "id_column": self.id_column,
                "limit": self.limit, "shard": None if self.shard is None else list(self.shard)}

    def _resolve(self) -> list[_Source]:
        """Every source expanded into the files (and dataset folders) it stands for."""
        return [found for source in self.sources for found in _expand(source)]

    def _records(self, sources: list[_Source]) -> Iterator[_Record]:
        """The given texts' records, then each source's."""
        for i, text in enumerate(self.texts):
            yield f"texts[{i}]", text, None
        for source in sources:
            yield from self._reader(source)

    def _reader(self, source: _Source) -> Iterator[_Record]:
        """The records of one source, read lazily."""
        read = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv,
                ".parquet": _read_parquet, "dataset": _read_dataset}[source.kind]
        return read(source, self.text_column, self.id_column)

    def _nothing_left(self, seen: int, sources: list[_Source]) -> str:
        """Why iteration yielded nothing."""
        if seen and self.shard is not None:
            return (f"shard {self.shard[0]}/{self.shard[1]} keeps none of the corpus's {seen} "
                    f"prompts; use at most {seen} shards")
        names = ", ".join(str(source.path) for source in sources)
        return f"the sources hold no prompts: {names}; give files with some text in them"


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N: shard I of N.

    Raises:
        ValueError: `text` is not of that form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"{SHARD_FORM}, got {text!r}")
    return _check_shard((int(match[1]), int(match[2])), repr(text))


def _check_shard(shard: Any, given: str) -> tuple[int, int]:
    """`shard` as (I, N) if it is two integers with 0 <= I < N, else ValueError."""
    pair = tuple(shard) if isinstance(shard, (tuple, list)) else ()
    if len(pair) != 2 or any(type(v) is not int for v in pair) or not 0 <= pair[0] < pair[1]:
        raise ValueError(f"{SHARD_FORM}, got {given}")
    return pair


def _check_text(prompt_id: int, where: str, text: str) -> None:
    """PromptError if `text` is empty or whitespace only."""
    if not text.strip():
        from tokenprobe.tokens import PromptError

        raise PromptError(f"prompt {prompt_id} ({where}) is empty or whitespace only; give "
                          "each prompt some text")


def _expand(source: str | os.PathLike) -> list[_Source]:
    """A source as files; a glob (a str with *, ? or [ that is no existing path) as its sorted
    matches, each then as if named."""
    name = os.fspath(source)
    if isinstance(source, str) and not os.path.lexists(name) and any(c in name for c in "*?["):
        matches = sorted(glob.glob(name, recursive=True))
        if not matches:
            raise CorpusError(f"no file matches the pattern {name}; check the pattern")
        return [found for match in matches for found in _expand_path(Path(match))]
    return _expand_path(Path(name))


def _expand_path(path: Path) -> list[_Source]:
    """A path as files: a prompt file, a dataset folder, or a folder's prompt files."""
    if not path.is_dir():
        if not path.exists():
            raise CorpusError(f"prompt source {path} does not exist; give {ACCEPTED}")
        if path.suffix.lower() not in SUFFIXES:
            raise CorpusError(f"{path}: not a kind of prompt file this reads (accepted: "
                              f"{', '.join(SUFFIXES)}); give {ACCEPTED}")
        return [_Source(path, path.suffix.lower(), (path,))]
    if (path / "dataset_dict.json").is_file():
        raise _splits_error(path)
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return [_Source(path, "dataset", (path / "state.json", *_data_files(path)))]
    try:
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in SUFFIXES
                        and not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)
    except OSError as err:
        raise CorpusError(f"cannot read directory {path}: {err.strerror}") from err
    if not files:
        raise CorpusError(f"directory {path} holds no {', '.join(SUFFIXES)} files (subfolders "
                          "are not read); point at the files, or a glob such as DIR/**/*.txt")
    return [_Source(p, p.suffix.lower(), (p,)) for p in files]


def _splits_error(path: Path) -> CorpusError:
    """The error for a DatasetDict folder: point at one of its splits."""
    splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
    return CorpusError(f"{path} is a datasets DatasetDict (splits: {_names(splits)}); point at "
                       "one split, DIR/<split>")


def _data_files(path: Path) -> list[Path]:
    """The Arrow files a `save_to_disk` folder's state.json lists."""
    state = path / "state.json"
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text("utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorpusError(f"cannot read the data files {state} lists ({err!r}); {RESAVE}") from err
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not (path / name).is_file():
            raise CorpusError(f"{state} lists a data file {name!r} that is not in {path}; {RESAVE}")
    return [path / name for name in names]


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


def _read_txt(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """A prompt per non-blank line (lines split as str.splitlines does)."""
    if id_col is not None:
        raise CorpusError(f'{source.path}: a .txt file has no "{id_col}" id column (no '
                          "columns at all); give that source as .jsonl or .csv, or no id_column")
    for number, line in _lines(source.path):
        for piece in line.splitlines():
            if piece.strip():
                yield f"{source.path}:{number}", piece, None


def _read_jsonl(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """A prompt per non-blank line: a JSON string, or an object with the text (and id)."""
    for number, line in _lines(source.path):
        if line.strip():
            where = f"{source.path}:{number}"
            try:
                item = json.loads(line)
            except ValueError as err:
                raise CorpusError(f"{where}: not valid JSON ({err})") from err
            yield _json_record(where, item, column, id_col)


def _json_record(where: str, item: Any, column: str | None, id_col: str | None) -> _Record:
    """The record of one JSON Lines value."""
    wanted = f'"{column}"' if column else " or ".join(f'"{c}"' for c in TEXT_COLUMNS)
    if isinstance(item, str):
        if id_col is not None:
            raise CorpusError(f'{where}: a JSON string has no "{id_col}" id; give objects '
                              "with that key, or no id_column")
        return where, item, None
    if not isinstance(item, dict):
        raise CorpusError(f"{where}: expected a string or an object with {wanted}")
    key = column or next((c for c in TEXT_COLUMNS if c in item), None)
    if key not in item:
        raise CorpusError(f"{where}: the object has no {wanted} key (its keys: "
                          f"{_names(item)}); name the text key with text_column (--text-column)")
    if id_col is not None and id_col not in item:
        raise CorpusError(f'{where}: the object has no "{id_col}" id key (its keys: '
                          f"{_names(item)}); give every record one, or another id_column")
    return where, _text(where, item[key], key), _doc(item.get(id_col or ID_COLUMN))


def _read_csv(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """A prompt per CSV row after the header (blank lines skipped; an empty id cell: no id)."""
    path, lines = source.path, _lines(source.path)
    reader = csv.reader((line for _, line in lines), strict=True)
    with contextlib.closing(lines):
        try:
            header = next(reader, None)
            if header is None:
                return
            text, ident = _pick(header, column, id_col, path)
            at = [header.index(text)] + ([header.index(ident)] if ident else [])
            start = reader.line_num + 1
            for row in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if row and len(row) <= max(at):
                    raise CorpusError(f"{where}: the row has {len(row)} fields, the header "
                                      f"{len(header)}; give every row the header's fields")
                if row:
                    yield where, row[at[0]], (row[at[1]] or None) if ident else None
        except csv.Error as err:
            raise CorpusError(f"{path}:{reader.line_num}: not valid CSV ({err})") from err


def _read_parquet(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """A prompt per Parquet row, read BATCH_ROWS rows (of the columns used) at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(source.path) as handle:
            text, ident = _pick(handle.schema_arrow.names, column, id_col, source.path)
            batches = handle.iter_batches(batch_size=BATCH_ROWS, columns=_used(text, ident))
            yield from _batch_records(source.path, batches, text, ident)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{source.path} is not a readable Parquet file ({err})") from err


def _read_dataset(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """A prompt per row of a `save_to_disk` folder: through `datasets.load_from_disk`
    (memory-mapped, read in batches) where `datasets` is installed, else `_read_arrow`."""
    try:
        import datasets
    except ImportError:
        yield from _read_arrow(source, column, id_col)
        return
    try:
        data = datasets.load_from_disk(str(source.path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorpusError(f"cannot load the dataset {source.path} ({err}); {RESAVE}") from err
    if not isinstance(data, datasets.Dataset):
        raise _splits_error(source.path)
    text, ident = _pick(data.column_names, column, id_col, source.path)
    batches = data.select_columns(_used(text, ident)).with_format("arrow")
    yield from _batch_records(source.path, batches.iter(batch_size=BATCH_ROWS), text, ident)


def _read_arrow(source: _Source, column: str | None, id_col: str | None) -> Iterator[_Record]:
    """The rows of the Arrow stream files a `save_to_disk` state.json lists, a record batch
    at a time (pyarrow only)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    numbers = itertools.count(1)
    try:
        for file in source.files[1:]:
            with pa.OSFile(str(file)) as handle:
                stream = ipc.open_stream(handle)
                text, ident = _pick(stream.schema.names, column, id_col, source.path)
                yield from _batch_records(source.path, stream, text, ident, numbers)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{source.path} holds an unreadable Arrow file ({err}); {RESAVE}"
                          ) from err


def _batch_records(path: Path, batches: Iterable[Any], text: str, ident: str | None,
                   numbers: Iterator[int] | None = None) -> Iterator[_Record]:
    """The records of Arrow record batches (or tables), numbered by `numbers` (from 1)."""
    numbers = numbers or itertools.count(1)
    for batch in batches:
        texts = batch.column(text).to_pylist()
        ids = batch.column(ident).to_pylist() if ident else [None] * len(texts)
        for value, doc in zip(texts, ids):
            where = f"{path} record {next(numbers)}"
            yield where, _text(where, value, text), _doc(doc)


def _pick(names: Sequence[str], column: str | None, id_col: str | None, where: Path
          ) -> tuple[str, str | None]:
    """The text column and the id column (None: none) of a source with columns `names`."""
    text = column or next((c for c in TEXT_COLUMNS if c in names), None)
    if text not in names:
        wanted = f'"{column}"' if column else " or ".join(f'"{c}"' for c in TEXT_COLUMNS)
        raise CorpusError(f"{where} has no {wanted} column (its columns: {_names(names)}); "
                          "name the text column with text_column (--text-column)")
    if id_col is not None and id_col not in names:
        raise CorpusError(f'{where} has no "{id_col}" id column (its columns: '
                          f"{_names(names)}); name another with id_column (--id-column)")
    ident = id_col or ID_COLUMN
    return text, ident if ident in names else None


def _used(text: str, ident: str | None) -> list[str]:
    """The columns to read: the text column and the id column."""
    return [text] if ident in (None, text) else [text, ident]


def _names(names: Iterable[Any], most: int = 20) -> str:
    """Column, key or split names for a message, the first `most` of them."""
    names = [str(n) for n in names]
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return (", ".join(names[:most]) or "none") + more


def _text(where: str, value: Any, column: str) -> str:
    """`value` if it is a string, else CorpusError naming the record."""
    if isinstance(value, str):
        return value
    what = "null" if value is None else f"of type {type(value).__name__}"
    raise CorpusError(f'{where}: the "{column}" value is {what}, not text; give every record a '
                      "string there")


def _doc(value: Any) -> str | None:
    """A record's doc_id: its id value as a string, None where it has none."""
    return None if value is None else str(value)
