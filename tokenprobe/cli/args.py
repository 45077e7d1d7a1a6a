"""What every subcommand shares: the exit codes and their help text, argparse types that check
numbers and devices, the model, prompt and run-directory options, and reading prompts;
`UsageError` for bad input (exit 2). The subcommands (`tokenprobe.cli.run`, the analyses' and
the app's CLI modules) import this module, never `tokenprobe.cli.main`, which loads them."""
from __future__ import annotations

import argparse
import json
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
    (`tokenprobe.placement.check_device`)."""
    from tokenprobe.placement import check_device

    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The `--model` option every model-loading subcommand shares."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="registered name (see `tokenprobe models`), HF directory, .gguf "
                             "file or hub id (default: smollm2-135m)")


def add_prompt_arguments(parser: argparse.ArgumentParser, *, corpus: bool = False) -> None:
    """`--prompt` and `--prompts`, read together by `gather_prompts`; with `corpus`, the
    sources a `tokenprobe.corpus.Corpus` reads lazily (`corpus_of`) and their options."""
    what = "source" if corpus else "file"
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt; repeat for several (prompt ids: --prompt texts first, "
                             f"then each --prompts {what} in order)")
    if not corpus:
        parser.add_argument("--prompts", action="append", metavar="FILE",
                            help=".txt (one prompt per non-blank line) or .jsonl (a JSON string "
                                 'or {"text": ...} per line); repeatable')
        return
    parser.add_argument("--prompts", action="append", metavar="SOURCE",
                        help=".txt (one prompt per non-blank line), .jsonl (a JSON string or "
                             "an object per line), .csv or .parquet; a directory of them "
                             "(sorted by name) or a glob; or a directory saved by Hugging Face "
                             'datasets (save_to_disk); repeatable. Records with a "response" '
                             'are scored on it alone (see --score); "messages" (chat, '
                             '[{"role", "content"}, ...]) go through the model\'s chat '
                             "template, a last assistant message being the response")
    parser.add_argument("--text-column", metavar="NAME",
                        help="the column or field holding the text (default: text, else "
                             "prompt, else messages)")
    parser.add_argument("--id-column", metavar="NAME",
                        help="the column kept as prompts.doc_id (default: id, when present)")
    parser.add_argument("--response-column", metavar="NAME",
                        help="the column holding each prompt's response, the answer to score "
                             "(default: response, when present)")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="run the first N prompts (after --shard) and stop reading")
    parser.add_argument("--shard", metavar="I/N", type=shard,
                        help="run shard I of N (0-based): the prompts whose id modulo N is I")


def shard(text: str) -> tuple[int, int]:
    """The argparse `type=` of --shard: I/N with 0 <= I < N."""
    from tokenprobe.corpus import parse_shard

    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def corpus_of(args: argparse.Namespace):
    """The `Corpus` of `add_prompt_arguments(corpus=True)`'s options, its sources opened (not
    read) before any model loads."""
    from tokenprobe.corpus import Corpus, CorpusError
    from tokenprobe.tokens import check_nonempty

    if not args.prompt and not args.prompts:
        raise UsageError("give prompts with --prompt TEXT (repeatable) or --prompts SOURCE")
    check_nonempty(list(args.prompt or []))
    try:
        corpus = Corpus(args.prompts or (), args.prompt or (), text_column=args.text_column,
                        id_column=args.id_column, response_column=args.response_column,
                        limit=args.limit, shard=args.shard)
        corpus.check()
    except CorpusError as err:
        raise UsageError(str(err)) from err
    return corpus


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


def device_map(text: str) -> str | dict:
    """The argparse `type=` of --device-map: a strategy or a JSON object {module: device}."""
    from tokenprobe.placement import DEVICE_MAPS

    if text in DEVICE_MAPS:
        return text
    if not text.lstrip().startswith("{"):
        raise argparse.ArgumentTypeError(
            f"must be {', '.join(DEVICE_MAPS)} or a JSON object such as "
            f'\'{{"model.layers.0": 0, "lm_head": "cpu"}}\', got {text}')
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({err}): {text}") from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(f"must be a non-empty JSON object from module name "
                                         f"to device, got {text}")
    for module, where in value.items():
        if isinstance(where, bool) or not isinstance(where, (int, str)):
            raise argparse.ArgumentTypeError(
                f"{module!r} maps to {json.dumps(where)}: a device is a GPU index, \"cpu\", "
                '"disk" or a string such as "cuda:1"')
    return value


def max_memory(text: str) -> dict:
    """The argparse `type=` of --max-memory: DEVICE=SIZE pairs, comma-separated, e.g.
    `0=20GiB,1=20GiB,cpu=64GiB` (DEVICE a GPU index, cpu or disk; SIZE bytes or a number with
    B, KB, MB, GB, TB, KiB, MiB, GiB or TiB); returns {device: bytes}."""
    from tokenprobe.placement import size_bytes

    out: dict = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not size:
            raise argparse.ArgumentTypeError(f"must be DEVICE=SIZE pairs such as "
                                             f"0=20GiB,cpu=64GiB, got {part or text!r}")
        index = key.removeprefix("cuda:")
        device_key: int | str = int(index) if index.isdigit() else key
        if isinstance(device_key, str) and device_key not in ("cpu", "disk", "mps"):
            raise argparse.ArgumentTypeError(f"{key!r} is not a device: use a GPU index (0, 1, "
                                             "... or cuda:N), cpu or disk")
        if size_bytes(size) < 0:
            raise argparse.ArgumentTypeError(f"{size!r} is not a size: use bytes or a number "
                                             "with a unit such as 20GiB or 1.5GB")
        if device_key in out:
            raise argparse.ArgumentTypeError(f"{key} is given twice")
        out[device_key] = size_bytes(size)
    return out


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device-map`, `--max-memory` and `--offload-folder`: a model spread over GPUs, CPU and
    disk through accelerate (`placement` turns them into `tokenprobe.load` keywords)."""
    group = parser.add_argument_group(
        "placement over several devices (needs accelerate: pip install 'tokenprobe[accelerate]')")
    group.add_argument("--device-map", type=device_map, metavar="MAP",
                       help="spread the model's blocks over devices instead of --device: auto, "
                            "balanced, balanced_low_0 or sequential (fill the GPUs, then CPU, "
                            "then disk) or a JSON object from module name to device, e.g. "
                            "'{\"model.embed_tokens\": 0, \"model.layers.0\": 0, \"\": 1}' "
                            '("" for the rest; a device is a GPU index, "cpu", "disk" or '
                            '"cuda:N"); use --dtype bfloat16 for large models')
    group.add_argument("--max-memory", type=max_memory, metavar="DEV=SIZE,...",
                       help="with a strategy --device-map, the most each device may hold, e.g. "
                            "0=20GiB,1=20GiB,cpu=64GiB (leave room for the probes' working set)")
    group.add_argument("--offload-folder", metavar="DIR",
                       help="with --device-map, where disk-offloaded weights are written when "
                            "they must be (a safetensors checkpoint is read in place)")


def placement(args: argparse.Namespace) -> dict:
    """The `tokenprobe.load` keywords of `--device`, `--device-map`, `--max-memory` and
    `--offload-folder`: {"device": ...} or {"device_map": ..., "max_memory": ...,
    "offload_folder": ...}; UsageError (before any model loads) when they disagree or a
    device is not one of this machine's. Module names are checked when the model's config is
    read (`tokenprobe.models.PlacementError`)."""
    from tokenprobe.placement import PlacementError, check_placement

    chosen = getattr(args, "device_map", None)
    device_ = getattr(args, "device", None)
    if chosen is not None and device_ not in (None, "cpu"):
        raise UsageError(f"pick one of --device {device_} (the whole model on one device) and "
                         "--device-map (its blocks spread over devices)")
    try:
        where = check_placement(None, chosen, getattr(args, "max_memory", None),
                                getattr(args, "offload_folder", None))
    except PlacementError as err:
        raise UsageError(_flags(str(err))) from err
    folder = getattr(args, "offload_folder", None)
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise UsageError(f"--offload-folder {folder} is a file, not a directory")
    return {"device": device_ or "cpu"} if where is None else where


def _flags(message: str) -> str:
    """A `tokenprobe.load` keyword's message in the CLI's flags."""
    for keyword in ("device_map", "max_memory", "offload_folder"):
        message = message.replace(keyword, f"--{keyword.replace('_', '-')}")
    return message


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
