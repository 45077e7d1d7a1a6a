"""`tokenprobe attribute`: attribution by ablation (analyses/attribution.py) saved as a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.attribution import KNOCKOUT_TO, METHODS, AttributionConfig
from tokenprobe.store import Run


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `attribute` subcommand to `subparsers`; its handler is `cmd_attribute`."""
    from tokenprobe.cli.args import (EXIT_CODES_NO_RESUME, NOTHING_WRITTEN, add_model_argument,
                                     add_prompt_arguments, add_run_dir_arguments, positive_int)

    p = subparsers.add_parser(
        "attribute", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="attribution by ablation: how much each prompt token matters to a target",
        description="Attribution by ablation: per prompt token, the change in the target's\n"
                    "log-prob (delta_logprob, nats; negative: the token supported it) when\n"
                    "the token is removed from the input (removal) or its key is masked for\n"
                    "every head of the chosen layers (knockout; Geva et al. 2023). The target\n"
                    "is --target (scored under teacher forcing), else the greedy next token.\n"
                    "Writes the tables prompts, tokens (prompt then target tokens) and\n"
                    "attributions; the dashboard's Tokens tab colours by it.",
        epilog="examples:\n"
               '  tokenprobe attribute --prompt "The capital of France is" --target " Paris" '
               "--out runs/paris\n"
               '  tokenprobe attribute --prompt "The capital of France is" --target " Paris" '
               "--method knockout \\\n      --to target --layers 0-14 15-29 --out runs/paris-"
               "halves\n"
               '  tokenprobe attribute --prompt "..." --method knockout --to target --window 9 '
               "--out runs/windows\n\n" + EXIT_CODES_NO_RESUME)
    add_model_argument(p)
    add_prompt_arguments(p)
    p.add_argument("--target", metavar="TEXT",
                   help='the continuation scored for every prompt, e.g. " Paris" (mind the '
                        "leading space); default: each prompt's greedy next token")
    p.add_argument("--method", choices=[*METHODS, "both"], default="both",
                   help="removal, knockout or both (default)")
    p.add_argument("--layers", nargs="+", metavar="SET",
                   help="knockout layer sets, 0-based, each its own layer_range: '0-8' or "
                        "'0-2,5'; several sets: --layers 0-8 9-17 (default: all layers as one "
                        "set; with --window: the window centres)")
    p.add_argument("--window", type=positive_int, metavar="K",
                   help="knock out K consecutive layers centred on each layer (Geva et al. use "
                        "K = 9), one layer_range per window")
    p.add_argument("--to", choices=KNOCKOUT_TO, default="later",
                   help="cut the token's key from every later query (later, default) or only "
                        "from the queries that predict the target (target; Geva et al.)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="ablated sequences per forward (default 16)")
    add_run_dir_arguments(p)
    p.set_defaults(func=cmd_attribute, on_interrupt=NOTHING_WRITTEN)
    return p


def parse_layer_set(spec: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5); raises ValueError on anything else."""
    layers: list[int] = []
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"bad layer set {spec!r}: use ranges like 0-8 or 0-2,5") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad layer range {part!r} in {spec!r}")
        layers += range(lo, hi + 1)
    return tuple(sorted(set(layers)))


def cmd_attribute(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe attribute`; returns the exit code."""
    import tokenprobe
    from tokenprobe.analyses.attribution import attribution_run
    from tokenprobe.cli.args import EXIT_OK, UsageError, gather_prompts
    from tokenprobe.store import check_target

    prompts = gather_prompts(args)
    if args.target is not None and not args.target:
        raise UsageError("--target is empty")
    methods = METHODS if args.method == "both" else (args.method,)
    try:
        sets = [parse_layer_set(s) for s in args.layers] if args.layers else None
        if args.window is not None and sets is not None and len(sets) > 1:
            raise ValueError("--window takes one layer set (the window centres)")
        config = AttributionConfig(methods=methods, window=args.window, to=args.to,
                                   batch_size=args.batch_size,
                                   layers=sets[0] if sets and args.window else None)
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded = tokenprobe.load(args.model, device=args.device)
    try:
        run = attribution_run(loaded, prompts, [args.target] * len(prompts), config,
                              layer_sets=None if args.window else sets, progress=not args.quiet,
                              out=args.out, overwrite=args.overwrite)
    except ValueError as err:  # layers outside the model, a one-token prompt for removal
        raise UsageError(str(err)) from err
    print_summary(run)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(run.meta['tables'])})")
    return EXIT_OK


def print_summary(run: Run, top: int = 3) -> None:
    """Per prompt and ablation: the target's log-prob and the tokens whose ablation costs most."""
    print(f"model {run.meta['model']}, {len(run.prompts)} prompt(s)")
    table = run.attributions
    for item in run.meta["summary"]["attribution"]:
        pid = item["prompt_id"]
        text = run.prompts.set_index("prompt_id").text[pid]
        head = (text[:48] + "...") if len(text) > 48 else text
        print(f"  [{pid}] {head!r} -> {item['target']!r}: log p {item['base_logprob']:.3f}")
        rows = table[table.prompt_id == pid]
        for (method, layers), group in rows.groupby(["method", "layer_range"], sort=False):
            worst = ", ".join(f"{t!r}@{p} ({d:+.2f})" for t, p, d in group.nsmallest(
                top, "delta_logprob")[["token", "pos", "delta_logprob"]].itertuples(index=False))
            label = method if not layers else f"{method} {layers}"
            print(f"        {label:<16} {worst}")
