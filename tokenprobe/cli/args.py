"""What every subcommand shares: the exit codes and their help text, argparse types that check
numbers and devices, the model, prompt and run-directory options, and reading prompts;
`UsageError` for bad input (exit 2). The subcommands (`tokenprobe.cli.run`, the analyses' and
the app's CLI modules) import this module, never `tokenprobe.cli.main`, which loads them."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from tokenprobe.jsonl import iter_jsonl

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_EXISTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_NONFINITE = 5
RESUME_NOTE = "finished batches are kept, run the same command again to resume"
NOTHING_WRITTEN = "nothing was written"  # commands that write their output only when complete
EXISTS_NOTE = ("--out is taken: it holds a complete run (--overwrite replaces it), or it is a\n"
               "       file or a non-empty directory that is not a run (choose another --out)")
STAGED_NOTE = (", or an\n       unfinished run with other settings is staged beside it in "
               ".NAME.partial (run\n       that command again to resume it, or delete it)")
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    unexpected failure (a bug: please report the traceback)
  {EXIT_USAGE}    bad input: arguments, empty prompt, unreadable or non-UTF-8 prompt file,
       prompt longer than the context without --truncate, SQL error, SQL that is not
       a read-only SELECT over the run tables, not a run dir or an unsafe run.json,
       a --device this machine lacks, an --out that cannot be written
  {EXIT_MODEL}    model not found or not loadable (unknown name, weights package missing,
       a .gguf file that is empty, not a GGUF, truncated or corrupt)
  {EXIT_EXISTS}    {EXISTS_NOTE}{STAGED_NOTE}
  {EXIT_NONFINITE}    tokenprobe run --strict: the run holds NaN or inf values (it is saved; its
       nonfinite table says where)
  {EXIT_INTERRUPTED}  interrupted; {RESUME_NOTE}"""
EXIT_CODES_NO_RESUME = EXIT_CODES.replace(RESUME_NOTE, NOTHING_WRITTEN).replace(STAGED_NOTE, "")


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str
            ) -> Callable[[str], Any]:
    """An argparse `type=`: `convert(text)` if `ok` holds for it, else argparse exits 2 with
    "argument --opt: must be WHAT, got TEXT" (before any model loads)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
finite_float = checked(float, math.isfinite, "a finite number")
seed = checked(int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")
port = checked(int, lambda v: 1 <= v <= 65535, "a port number from 1 to 65535")
positive_ints = checked(lambda text: [int(t) for t in text.split(",") if t.strip()],
                        lambda v: bool(v) and min(v) >= 1, "comma-separated positive integers")


def device(text: str) -> str:
    """The argparse `type=` of --device: a torch device this machine has
    (`tokenprobe.models.check_device`)."""
    from tokenprobe.models import check_device

    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The `--model` option every model-loading subcommand shares."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="registered name (see `tokenprobe models`), HF directory, .gguf "
                             "file or hub id (default: smollm2-135m)")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """`--prompt` and `--prompts`, read together by `gather_prompts`."""
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt; repeat for several (prompt ids: --prompt texts first, "
                             "then each --prompts file in order)")
    parser.add_argument("--prompts", action="append", metavar="FILE",
                        help=".txt (one prompt per non-blank line) or .jsonl (a JSON string or "
                             '{"text": ...} per line); repeatable')


def add_run_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """`--out`, `--overwrite`, `--device` and `--quiet` of the commands that write a run."""
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete run at --out")
    parser.add_argument("--device", default="cpu", type=device,
                        help="torch device: cpu (default), cuda, cuda:N or mps; checked before "
                             "the model loads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class UsageError(Exception):
    """Bad input from the user; exits with EXIT_USAGE."""


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per non-blank line) or .jsonl (a string or {"text": ...} per
    line)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read prompt file {path}: {err.strerror}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"prompt file {path} is not UTF-8 (byte {err.start}: "
                         f"{raw[err.start:err.start + 1]!r}); re-encode it as UTF-8") from err
    if path.suffix == ".jsonl":
        prompts = []
        try:
            for n, item in iter_jsonl(text, path):
                item = item.get("text", item.get("prompt")) if isinstance(item, dict) else item
                if not isinstance(item, str):
                    raise UsageError(f'{path}:{n}: expected a string or an object with "text"')
                prompts.append(item)
        except ValueError as err:
            raise UsageError(str(err)) from err
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts")
    return prompts


def gather_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt texts, then each --prompts file's, checked non-empty before a model loads."""
    from tokenprobe.tokens import check_nonempty

    prompts = list(args.prompt or [])
    for file in args.prompts or []:
        prompts += read_prompts(Path(file))
    if not prompts:
        raise UsageError("give prompts with --prompt TEXT (repeatable) or --prompts FILE")
    check_nonempty(prompts)
    return prompts
