"""JSON Lines text: one JSON value per non-blank line, errors that name the file and line."""
from __future__ import annotations

import json
from typing import Any, Iterator


def iter_jsonl(text: str, where: object) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for each non-blank line of `text`.

    Raises:
        ValueError: a line is not valid JSON (the message names `where` and the line).
    """
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}:{n}: not valid JSON ({err})") from err
