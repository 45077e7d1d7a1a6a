"""`tokenprobe report`: the command line of scripted reports (analyses/report.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenprobe.analyses.sink_curve import DEFAULT_TS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `report` subcommand to `subparsers`; its handler is `cmd_report`."""
    from tokenprobe.cli.args import (EXISTS_NOTE, EXIT_CODES_NO_RESUME, NOTHING_WRITTEN,
                                     nonnegative_int, positive_ints)

    p = subparsers.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="an HTML report with static figures and LaTeX tables from run directories",
        description="Write a report of one or more runs into --out:\n"
                    "  report.html    self-contained (plotly.js inlined; opens offline)\n"
                    "  figures/       every figure as PNG, SVG and PDF (needs Chrome/Chromium:\n"
                    "                 Debian's `chromium`, or BROWSER_PATH; skipped if none)\n"
                    "  tables/        every table as CSV and booktabs LaTeX\n"
                    "Per run: model, prompts, massive activations, sink rate with T and eps,\n"
                    "sink_mass and resid_norm heatmaps, token views, critical tokens, and\n"
                    "replication cards (the paper's reported figure beside ours). Across runs:\n"
                    "sink rate, first massive layer and mean entropy per run (DuckDB).\n"
                    "--curve-models adds Gu et al.'s sink rate against T, measured now;\n"
                    "--compare-runs adds the runs side by side (sink mass per layer, largest\n"
                    "|h| per layer, attention received) on the texts they share.\n"
                    "Static figures are named <run>_<model>_p<prompt>_<kind> and each has\n"
                    "a one-sentence caption in <name>.txt (model, run, prompt, measure, units).",
        epilog="examples:\n  tokenprobe report runs/demo --out runs/demo-report\n"
               "  tokenprobe report runs/a runs/b --out paper-figs --style paper --overwrite\n"
               "  tokenprobe report runs/smollm2 runs/gemma3 --compare-runs --style paper "
               "--width double --out cmp\n"
               "  tokenprobe report --curve-models smollm2-135m,gemma3-270m,runs/toy/"
               "bigram-backcopy-L1 --out runs/curve\n\n" + EXIT_CODES_NO_RESUME.replace(
                   EXISTS_NOTE, "--out exists and is not empty (--overwrite replaces it)"))
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="complete run directories")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to create")
    p.add_argument("--style", choices=["screen", "paper"], default="screen",
                   help="screen: 900 px figures; paper: 3.3 in column width, 9 pt serif, "
                        "300 dpi PNG (default screen)")
    p.add_argument("--width", metavar="single|double|INCHES",
                   help="paper figure width: single (3.3 in, one column), double (7 in, both "
                        "columns) or inches (default single; with --style paper)")
    p.add_argument("--compare-runs", action="store_true",
                   help="add figures of the runs side by side on the texts they share (two or "
                        "more RUN_DIRs, e.g. two models on the same prompts)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-static", action="store_true",
                   help="skip the PNG/SVG/PDF figures (HTML and tables only)")
    p.add_argument("--max-prompts", type=nonnegative_int, default=2, metavar="N",
                   help="prompts per run with figures and token views (default 2)")
    curve = p.add_argument_group("sink rate against T (runs the models now)")
    curve.add_argument("--curve-models", metavar="M1,M2",
                       help="comma-separated registered names or model directories (a toy "
                            "directory from `tokenprobe toy` is measured on its own sequences)")
    curve.add_argument("--curve-T", type=positive_ints, default=",".join(map(str, DEFAULT_TS)),
                       metavar="T1,T2",
                       help=f"context lengths (default {','.join(map(str, DEFAULT_TS))})")
    curve.add_argument("--curve-prompts", metavar="FILE",
                       help="texts for the curve (.txt or .jsonl; default: the passages of "
                            "tokenprobe/data/long_prose.jsonl, joined in rotation)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_report, on_interrupt=NOTHING_WRITTEN)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe report`; returns the exit code."""
    import pandas as pd

    from tokenprobe.cli.args import EXIT_OK, UsageError, read_prompts
    from tokenprobe.store import RunNotFoundError, check_writable, is_complete, table_files

    if not args.runs and not args.curve_models:
        raise UsageError("give at least one RUN_DIR, or --curve-models")
    if args.compare_runs and len(args.runs) < 2:
        raise UsageError("--compare-runs needs two or more RUN_DIRs")
    _style(args)  # a bad --width fails before any model runs
    for run_dir in args.runs:
        if not is_complete(Path(run_dir)):
            raise RunNotFoundError(f"{run_dir} is not a complete tokenprobe run (no run.json "
                                   "with status complete)")
        table_files(Path(run_dir))  # an unsafe run.json fails here, before any model runs
    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass "
                              "--overwrite to replace it")
    check_writable(out)
    curve = None
    if args.curve_models:
        Ts = args.curve_T  # positive integers (the parser's `positive_ints`)
        texts = read_prompts(Path(args.curve_prompts)) if args.curve_prompts else None
        curve = pd.concat([_curve(m.strip(), Ts, texts, quiet=args.quiet)
                           for m in args.curve_models.split(",") if m.strip()],
                          ignore_index=True)
    style = _style(args)
    _say(args, f"writing the report of {len(args.runs)} run(s) to {out} ...")
    _write(args, out, style, curve)
    info = json.loads((out / "manifest.json").read_text())
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"report written to {out}/report.html  ({len(info['figures'])} figures, "
          f"{len(info['tables'])} tables)")
    if curve is not None:
        print(curve.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return EXIT_OK


def _style(args: argparse.Namespace):
    """The figure style of `--style` and `--width`."""
    from tokenprobe.analyses.report_export import STYLES, paper_style
    from tokenprobe.cli.args import UsageError

    if args.width is None:
        return STYLES[args.style]
    if args.style != "paper":
        raise UsageError("--width sets the width of paper figures: add --style paper")
    try:
        return paper_style(args.width)
    except ValueError as err:
        raise UsageError(f"--width: {err}") from None


def _write(args: argparse.Namespace, out: Path, style, curve) -> None:
    """The report (`report.write_report`): HTML, tables, static figures unless --no-static
    or no browser is found, and with --compare-runs the runs side by side."""
    from tokenprobe.analyses.report import write_report

    write_report(args.runs, out, style=style, curve=curve, overwrite=args.overwrite,
                 static=False if args.no_static else None, max_prompts=args.max_prompts,
                 compare=args.compare_runs)


def _curve(model: str, Ts: list[int], texts, *, quiet: bool):
    from tokenprobe.analyses.sink_curve import curve_for

    if not quiet:
        print(f"measuring the sink rate of {model} at T = {Ts} ...", file=sys.stderr)
    return curve_for(model, Ts, texts=texts, progress=not quiet)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)
