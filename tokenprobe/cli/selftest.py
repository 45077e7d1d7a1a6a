"""`tokenprobe selftest`: every kernel implementation against the float64 reference on a device."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys

from tokenprobe.cli.args import EXIT_FAILED, EXIT_OK, device, nonnegative_int

EPILOG = f"""exit codes:
  {EXIT_OK}    every implementation that runs here is within its tolerance
  {EXIT_FAILED}    one failed (a FAIL row; stderr names the op): please report the table
  2    bad arguments (e.g. a --device this machine lacks)"""
HEADER = ("op", "case", "impl", "dtype", "worst err", "tol", "time/call", "x torch", "result")
WIDTHS = (20, 42, 6, 8, 9, 6, 10, 8, 0)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `selftest` subcommand to `subparsers`; its handler is `cmd_selftest`."""
    from tokenprobe.kernels.selfcheck import FAST

    p = subparsers.add_parser(
        "selftest", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="check every kernel implementation against the float64 reference on a device",
        description="Run every implementation of every kernel op (torch, flash, triton) against "
                    "the float64 reference at the embedded models' attention shapes and widths "
                    "(T = 13, vocabulary cut to 4099, float32) and print a table: worst error, "
                    "tolerance, time per call against the torch path. Implementations that "
                    "cannot run on the device are listed as skipped with the reason. Run it "
                    "once on a GPU with --device cuda --full.")
    p.add_argument("--device", type=device, default=None,
                   help="torch device (default: cuda if there is one, else cpu; triton on cpu "
                        "needs TRITON_INTERPRET=1 set, and is slow there)")
    p.add_argument("--full", action="store_true",
                   help="add bfloat16, the whole vocabularies and T = 1024 (attention) or 512 "
                        "(for a GPU: the references take several GB)")
    p.add_argument("--repeats", type=nonnegative_int, default=None,
                   help="timed calls per implementation, median reported; 0: no timing "
                        "(default: 3 on cuda, else 1)")
    p.add_argument("--op", action="append", choices=list(FAST), dest="ops",
                   help="only this op (repeatable; default: all)")
    p.set_defaults(func=cmd_selftest)
    return p


def cmd_selftest(args: argparse.Namespace) -> int:
    import torch

    from tokenprobe.kernels.selfcheck import device_name, selftest

    where = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats if args.repeats is not None else (3 if where.startswith("cuda") else 1)
    triton = (importlib.metadata.version("triton") if importlib.util.find_spec("triton")
              else "not installed")
    interpret = ", TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    print(f"tokenprobe selftest on {device_name(where)}: torch {torch.__version__}, "
          f"triton {triton}{interpret}{', --full' if args.full else ''}")
    print(_line(HEADER), flush=True)
    counts = {"ok": 0, "FAIL": 0, "skipped": 0}
    failed = []
    for row in selftest(where, full=args.full, repeats=repeats, ops=tuple(args.ops or ())):
        counts[row.status] += 1
        result = row.status + (f" ({row.note})" if row.note else "")
        print(_line((row.op, row.case, row.impl, row.dtype, _num(row.error, ".2e"),
                     _num(row.tol, "g"), _seconds(row.time_s), _num(row.x_torch, ".2f"),
                     result)), flush=True)
        if row.status == "FAIL":
            failed.append(row)
    print(f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skipped']} skipped")
    for row in failed:
        print(f"tokenprobe: selftest: {row.op} impl={row.impl} {row.dtype} on {row.case} "
              f"failed: {row.note or 'error ' + _num(row.error, '.3g')} (tolerance "
              f"{row.tol:g})", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _line(cells) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS)).rstrip()


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f} ms" if x < 1 else f"{x:.2f} s"
