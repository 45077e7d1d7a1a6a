"""What the benchmarks share: the benchmark text, RSS readings, the machine line and the long CSV.

Standard library only, so that a benchmark's parent process stays light (a child's ru_maxrss
starts from its parent's RSS on Linux).
"""
from __future__ import annotations

import csv
import importlib.metadata
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

COLUMNS = ["name", "provider", "x_name", "x_value", "metric", "value", "machine"]

# Deterministic natural-language input, repeated until it is long enough for any T.
PARAGRAPHS = (
    "The ferry left the harbour a little after seven, when the fog had thinned enough for the "
    "pilot to see the green light on the breakwater. Most of the passengers stayed inside, "
    "reading or sleeping against the windows, but a few stood at the rail with their collars "
    "turned up and watched the town shrink behind them until only the church tower remained.",
    "In the library of the old school, the catalogue was still kept on cards. Each drawer held "
    "a few hundred of them, typed on a machine whose letter e sat slightly above the line, and "
    "the librarian claimed she could date a card to within a year by the colour of its ribbon.",
    "Bread rises because yeast turns sugar into carbon dioxide and alcohol. The gas is caught "
    "in a web of gluten, which stretches as the bubbles grow; the oven then sets the web, drives "
    "off the alcohol and browns the crust, which is why a loaf smells different from its dough.",
    "When the committee finally met, nobody had read the report. The chair summarised it from "
    "memory, got two of the numbers wrong, and was corrected by the treasurer, who had not read "
    "it either but had written the spreadsheet the numbers came from three years before.",
)


def benchmark_input(tokenizer: Any, tokens: int) -> tuple[str, list[int]]:
    """A text whose tokenisation (with the tokenizer's default special tokens) is exactly
    `tokens` ids, and those ids; deterministic for a given tokenizer.

    Raises:
        RuntimeError: no window of the repeated paragraphs re-tokenises to exactly `tokens`.
    """
    specials = len(tokenizer("a")["input_ids"]) - len(
        tokenizer("a", add_special_tokens=False)["input_ids"])
    body_len = tokens - specials
    unit = "\n\n".join(PARAGRAPHS) + "\n\n"
    per_unit = len(tokenizer(unit, add_special_tokens=False)["input_ids"])
    body = tokenizer(unit * (body_len // per_unit + 3), add_special_tokens=False)["input_ids"]
    for offset in range(64):  # shift the window until its decoded text round-trips
        text = tokenizer.decode(body[offset:offset + body_len])
        ids = tokenizer(text)["input_ids"]
        if len(ids) == tokens and text.strip():
            return text, ids
    raise RuntimeError(f"no text of the benchmark paragraphs re-tokenises to exactly {tokens} "
                       "tokens; the token-id comparison between providers would be unfair")




def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def machine() -> str:
    """Platform, CPU count and torch version (read without importing torch)."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return f"{platform.platform()}; {os.cpu_count()} cpus; torch {torch_version}"


def write_csv(rows: list[list], out: Path) -> None:
    """Write `rows` to `out` atomically (a temporary file in the same folder, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
