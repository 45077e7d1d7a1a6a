"""`tokenprobe spans`: two models with different tokenisers compared on character spans of the
same text (analyses/spans.py), saved as a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.spans_segment import UNITS
from tokenprobe.store import Run

DESCRIPTION = """\
Compare two models whose tokenisers differ (e.g. smollm2-135m and gemma3-270m) on the same
text, cut into character spans: words (default; a word with the whitespace before it),
matches of --pattern (--unit regex), or sentences. Each model runs its own tokenisation.

  surprisal      -log p(span | everything before it), in nats: the sum of -log p over the
                 model's tokens that start inside the span
  entropy_first  entropy (nats) of the distribution that predicts the span's first token
  exact          the model's tokenisation has a token boundary at both span edges. When a
                 token straddles an edge, all its surprisal goes to the span where it starts
                 (the sum over a prompt is unchanged) and the span is not exact for that
                 model. Only spans exact for both models measure the same event; the
                 summary's mean |difference| and correlation use those.

A model whose tokenizer adds no start token (SmolLM2) is given one as context
(<|endoftext|>, else its BOS, else its EOS) so that the first word is scored too;
--no-start-token leaves it unscored. Writes the tables prompts (+ per-prompt totals),
tokens (model A's tokenisation), span_tokens (both models' tokens) and spans; the
dashboard's Spans tab and `tokenprobe report` show them."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `spans` subcommand to `subparsers`; its handler is `cmd_spans`."""
    from tokenprobe.cli.args import (EXIT_CODES_NO_RESUME, NOTHING_WRITTEN, add_model_argument,
                                     add_prompt_arguments, add_run_dir_arguments, positive_int)

    p = subparsers.add_parser(
        "spans", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compare two models with different tokenisers on character spans (surprisal)",
        description=DESCRIPTION,
        epilog="examples:\n"
               '  tokenprobe spans --model smollm2-135m --vs gemma3-270m --prompt "The cat sat '
               'on the mat." --out runs/spans\n'
               "  tokenprobe spans --vs gemma3-270m --prompts texts.txt --unit sentence "
               "--out runs/sentences\n"
               "  tokenprobe spans --vs gemma3-270m --prompts texts.txt --unit regex "
               "--pattern '\\w+|[^\\w\\s]' --out runs/words-and-punct\n\n"
               "\n" + EXIT_CODES_NO_RESUME)
    add_model_argument(p)
    p.add_argument("--vs", required=True, metavar="MODEL",
                   help="the second model (B): any tokeniser; same forms as --model")
    add_prompt_arguments(p)
    p.add_argument("--unit", choices=[u for u in UNITS if u != "offsets"], default="word",
                   help="word (default: whitespace words, leading whitespace attached), regex "
                        "(needs --pattern) or sentence")
    p.add_argument("--pattern", metavar="REGEX",
                   help="with --unit regex: each non-empty match is a span, the unmatched text "
                        "before it attached (Python re syntax)")
    p.add_argument("--no-start-token", action="store_true",
                   help="do not give a model whose tokenizer adds no start token one as "
                        "context; its first token is then unscored (surprisal NaN)")
    p.add_argument("--bytes", action="store_true",
                   help="also the Jensen-Shannon divergence of the two models' exact next-byte "
                        "distributions (Phan et al.) at each span's first byte, column "
                        "jsd_byte (nats, at most ln 2; slow: seconds a span on a CPU)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="prompts per forward (default 8)")
    p.add_argument("--top", type=positive_int, default=5,
                   help="spans printed where the models disagree most (default 5)")
    add_run_dir_arguments(p)
    p.set_defaults(func=cmd_spans, on_interrupt=NOTHING_WRITTEN)
    return p


def cmd_spans(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe spans`; returns the exit code."""
    import tokenprobe
    from tokenprobe.analyses.spans import spans_run
    from tokenprobe.analyses.spans_segment import compile_pattern, segment
    from tokenprobe.cli.args import EXIT_OK, UsageError, gather_prompts
    from tokenprobe.store import check_target

    prompts = gather_prompts(args)
    if args.unit == "regex" and not args.pattern:
        raise UsageError("--unit regex needs --pattern REGEX")
    if args.pattern is not None and args.unit != "regex":
        raise UsageError("--pattern goes with --unit regex")
    if args.pattern is not None:
        try:
            compile_pattern(args.pattern)
        except ValueError as err:
            raise UsageError(f"--pattern: {err}") from err
    for i, text in enumerate(prompts):  # every prompt is cut before any model loads
        try:
            segment(text, args.unit, pattern=args.pattern)
        except ValueError as err:
            raise UsageError(f"prompt {i}: {err}") from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded_a = tokenprobe.load(args.model, device=args.device)
    loaded_b = tokenprobe.load(args.vs, device=args.device)
    try:
        run = spans_run(loaded_a, loaded_b, prompts, unit=args.unit, pattern=args.pattern,
                        start_token=None if args.no_start_token else "auto",
                        batch_size=args.batch_size, byte_jsd=args.bytes, out=args.out,
                        overwrite=args.overwrite)
    except ValueError as err:  # a slow tokenizer; PromptError (over-long) is a ValueError too
        raise UsageError(str(err)) from err
    print_summary(run, top=args.top)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(run.meta['tables'])})")
    return EXIT_OK


def print_summary(run: Run, top: int = 5, first: int = 8) -> None:
    """The models, the first spans of prompt 0 with both surprisals, the summary figures and
    the spans where the models disagree most (exact ones)."""
    from tokenprobe.analyses.spans_views import disagreements, shown_text, summary_line

    meta, spans = run.meta, run.spans
    print(f"A {meta['model']} vs B {meta['model_b']}: {len(run.prompts)} prompt(s), "
          f"{len(spans)} spans ({meta['config']['unit']})")
    print(f"  {'span':<22} {'A nats':>8} {'B nats':>8} {'B - A':>8}  tokens A/B  exact")
    for row in spans[spans.prompt_id == spans.prompt_id.min()].head(first).itertuples():
        print(f"  {shown_text(row.text, 22):<22} {row.surprisal_a:8.2f} {row.surprisal_b:8.2f} "
              f"{row.surprisal_diff:+8.2f}  {row.n_tokens_a:>4}/{row.n_tokens_b:<4}   "
              f"{'yes' if row.exact else 'no'}")
    print(summary_line(meta["summary"]["spans"]))
    worst = disagreements(spans, top)
    if len(worst):
        print("  most disagreement (exact spans): " + ", ".join(
            f"[{r.prompt_id}] {shown_text(r.text, 20)!r} ({r.surprisal_diff:+.2f})"
            for r in worst.itertuples()))
