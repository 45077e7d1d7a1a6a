"""Prompts read lazily from texts and .txt/.jsonl/.csv/.parquet files, folders, globs, datasets."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tokenprobe.corpus_files import (RESAVE, Columns, CorpusError, _json_record, _read_csv,
                                     _read_dataset, _read_jsonl, _read_parquet, _read_txt, _Record, _Source,
                                     _splits_error)

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
ACCEPTED = ("a .txt, .jsonl, .csv or .parquet file, a folder of them, a glob pattern, or a "
            "folder written by datasets' save_to_disk")
SHARD_FORM = "a shard is I/N with 0 <= I < N (e.g. 0/4 to 3/4)"




@dataclass(frozen=True)
class Prompt:
    """One prompt of a corpus.

    Attributes:
        prompt_id: 0-based position in the whole corpus (before shard and limit selection).
        text: the prompt's text (with a response: the part before it; chat messages: their
            contents, one per line, until the model's chat template renders them).
        doc_id: the record's id column as a string; None when the source has none.
        response: the answer that follows `text`, scored on its own (entropy bands, forking
            tokens and summaries; `score="response"`); None when there is none.
        messages: chat messages as (role, content) pairs, rendered by the model's chat
            template when the prompt is run (a last "assistant" message is the response).
    """
    prompt_id: int
    text: str
    doc_id: str | None
    response: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


class Corpus:
    """The prompts of `texts`, then of each source in order, read only as they are iterated.

    A text is a str or a record as a .jsonl line holds it, e.g. {"prompt": ..., "response":
    ...} or {"messages": [...]}.

    A source is a .txt file (a prompt per non-blank line), .jsonl (a JSON string or object per
    line), .csv or .parquet (a text column), a folder (its files of those kinds by name, not
    recursive, hidden and other files ignored), a folder saved by `datasets`' `save_to_disk`,
    or a glob pattern (its matches sorted). The text is `text_column`, else "text", else
    "prompt", else "messages" (chat messages, a list of {"role", "content"} objects); a .txt
    has no columns. `id_column` (default "id", used where present) gives `doc_id`,
    `response_column` (default "response", used where present) the response. `shard=(i, n)` keeps the prompts whose id is i modulo n, `limit` the first of
    those (reading stops there). Every record read is checked, other shards' too, so each shard
    of a bad corpus fails alike.

    Raises:
        ValueError: no texts and no sources, a limit below 1 or a bad shard.
        TypeError: `sources` or `texts` is one string, or holds what is not a path / a str.
    """

    def __init__(self, sources: Sequence[str | os.PathLike] = (),
                 texts: Sequence[str | dict] = (), *,
                 text_column: str | None = None, id_column: str | None = None,
                 response_column: str | None = None, limit: int | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        if isinstance(sources, (str, bytes, os.PathLike)) or isinstance(texts, (str, bytes)):
            raise TypeError("sources and texts are sequences; wrap a single one in a list")
        self.sources, self.texts = tuple(sources), tuple(texts)
        if not all(isinstance(s, (str, os.PathLike)) for s in self.sources) \
                or not all(isinstance(t, (str, dict)) for t in self.texts):
            raise TypeError("each source is a path (str or os.PathLike), each text a str or a "
                            'record such as {"prompt": ..., "response": ...}')
        if not self.sources and not self.texts:
            raise ValueError("no prompts given")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        self.text_column, self.id_column, self.limit = text_column, id_column, limit
        self.response_column = response_column
        self._columns = Columns(text_column, id_column, response_column)
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
            for prompt_id, record in enumerate(records):
                seen += 1
                prompt = _prompt(prompt_id, *record)
                if self.shard is None or prompt_id % self.shard[1] == self.shard[0]:
                    yield prompt
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
        for i, record in enumerate(self._given()):
            _prompt(i, *record)
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
            text = text if isinstance(text, str) else json.dumps(text, sort_keys=True)
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big") + data)
        files = [(file, file.stat()) for source in self._resolve() for file in source.files]
        return {"texts_sha256": digest.hexdigest(),
                "sources": [{"path": str(file.resolve()), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns} for file, st in files],
                "text_column": self.text_column, "id_column": self.id_column,
                **({"response_column": self.response_column} if self.response_column else {}),
                "limit": self.limit, "shard": None if self.shard is None else list(self.shard)}

    def _resolve(self) -> list[_Source]:
        """Every source expanded into the files (and dataset folders) it stands for."""
        return [found for source in self.sources for found in _expand(source)]

    def _records(self, sources: list[_Source]) -> Iterator[_Record]:
        """The given texts' records, then each source's."""
        yield from self._given()
        for source in sources:
            yield from self._reader(source)

    def _given(self) -> Iterator[_Record]:
        """The records of the given texts: a str, or an object read as a JSON Lines record
        (text or prompt, response, messages, id)."""
        for i, text in enumerate(self.texts):
            where = f"texts[{i}]"
            yield (where, text, None, None) if isinstance(text, str) else \
                _json_record(where, text, self._columns)

    def _reader(self, source: _Source) -> Iterator[_Record]:
        """The records of one source, read lazily."""
        read = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv,
                ".parquet": _read_parquet, "dataset": _read_dataset}[source.kind]
        return read(source, self._columns)

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


def _prompt(prompt_id: int, where: str, text: str | tuple, doc_id: str | None,
            response: str | None) -> Prompt:
    """The prompt of a record, checked: PromptError if its text (or response) is empty or
    whitespace only, CorpusError if chat messages come with a response."""
    messages = text if isinstance(text, tuple) else None
    if messages is not None:
        if response is not None:
            raise CorpusError(f"{where}: chat messages and a response; give the answer as the "
                              'last message, {"role": "assistant", ...}, or a text and response')
        text = "\n".join(content for _, content in messages)
    _check_text(prompt_id, where, text)
    if response is not None:
        _check_text(prompt_id, where, response, "its response")
    return Prompt(prompt_id, text, doc_id, response, messages)


def _check_text(prompt_id: int, where: str, text: str, what: str = "") -> None:
    """PromptError if `text` is empty or whitespace only."""
    if not text.strip():
        from tokenprobe.tokens import PromptError

        raise PromptError(f"prompt {prompt_id} ({where}){' ' + what if what else ''} is empty "
                          "or whitespace only; give each prompt some text")


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
