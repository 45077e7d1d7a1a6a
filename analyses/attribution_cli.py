"""`tokenprobe attribute`: attribution by ablation (analyses/attribution.py) saved as a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.attribution import KNOCKOUT_TO, METHODS, AttributionConfig
from tokenprobe.analyses.attribution_shapley import ABSENT
from tokenprobe.analyses.attribution_units import KINDS
from tokenprobe.analyses.unit_attribution import UNIT_METHODS
from tokenprobe.store import Run

GRADIENT_OR_GAME = ("saliency", "input_x_gradient", "integrated_gradients", "shapley")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `attribute` subcommand to `subparsers`; its handler is `cmd_attribute`."""
    from tokenprobe.cli.args import (EXIT_CODES_NO_RESUME, NOTHING_WRITTEN, add_model_argument,
                                     add_prompt_arguments, add_run_dir_arguments, positive_int)

    p = subparsers.add_parser(
        "attribute", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="how much each prompt token or unit matters to a target (ablation, gradients, "
             "Shapley values)",
        description="Attribution by ablation: per prompt token, the change in the target's\n"
                    "log-prob (delta_logprob, nats; negative: the token supported it) when\n"
                    "the token is removed from the input (removal) or its key is masked for\n"
                    "every head of the chosen layers (knockout; Geva et al. 2023). The target\n"
                    "is --target (scored under teacher forcing), else the greedy next token.\n"
                    "Writes the tables prompts, tokens (prompt then target tokens) and\n"
                    "attributions; the dashboard's Tokens tab colours by it.\n\n"
                    "With a gradient or Shapley --method, --units, --options or --compression,\n"
                    "it attributes the target to prompt units instead (table\n"
                    "unit_attributions; values in nats, positive when the unit raises the\n"
                    "target): saliency, input x gradient, integrated gradients, Shapley values\n"
                    "(exact up to 10 units, else sampled with standard errors), and removal or\n"
                    "knockout of a whole unit; --compression adds the curve of the target with\n"
                    "only the top / bottom / random k% of units (table attribution_curves).\n"
                    "The dashboard's Attribution tab and the report show them.",
        epilog="examples:\n"
               '  tokenprobe attribute --prompt "The capital of France is" --target " Paris" '
               "--out runs/paris\n"
               '  tokenprobe attribute --prompt "The capital of France is" --target " Paris" '
               "--method knockout \\\n      --to target --layers 0-14 15-29 --out runs/paris-"
               "halves\n"
               '  tokenprobe attribute --prompt "..." --method knockout --to target --window 9 '
               "--out runs/windows\n"
               '  tokenprobe attribute --prompt "Is the sky green? Answer:" --options " yes" '
               '" no" \\\n      --method shapley integrated_gradients removal --units word '
               "--compression --out runs/sky\n\n" + EXIT_CODES_NO_RESUME)
    add_model_argument(p)
    add_prompt_arguments(p)
    p.add_argument("--target", metavar="TEXT",
                   help='the continuation scored for every prompt, e.g. " Paris" (mind the '
                        "leading space); default: each prompt's greedy next token")
    p.add_argument("--method", nargs="+", choices=[*METHODS, "both", *GRADIENT_OR_GAME, "all"],
                   default=["both"], metavar="METHOD",
                   help="removal, knockout, both (default: per token, table attributions), "
                        "and saliency, input_x_gradient, integrated_gradients, shapley, all "
                        "(per unit, table unit_attributions with removal and knockout of whole "
                        "units too)")
    units = p.add_argument_group(
        "units", "attribution to prompt units, table unit_attributions: any of these (or a "
                 "gradient or Shapley --method) selects it; the values are contributions, "
                 "positive when the unit raises the target (saliency: a gradient norm)")
    units.add_argument("--units", choices=KINDS,
                       help="token, word (default of this mode), sentence, or span (with "
                            "--delimiter)")
    units.add_argument("--delimiter", metavar="TEXT",
                       help="--units span: cut the prompt after each occurrence, e.g. '\\n'")
    units.add_argument("--options", nargs=2, metavar=("A", "B"),
                       help='the target is log p(A) - log p(B), a decision between two answers, '
                            'e.g. --options " yes" " no"')
    units.add_argument("--ig-steps", type=positive_int, default=50, metavar="N",
                       help="integrated gradients' quadrature points (default 50, as Captum)")
    units.add_argument("--baseline", default="zero", metavar="B",
                       help="integrated gradients' baseline: zero (default), pad, mask, or a "
                            "text of as many tokens as the prompt")
    units.add_argument("--permutations", type=positive_int, metavar="N",
                       help="Shapley: sample N orders (antithetic pairs, so even; default: "
                            "exact for <= 10 units, else 64)")
    units.add_argument("--seed", type=int, default=0, help="Shapley's and random subsets' seed")
    units.add_argument("--absent", choices=ABSENT, default="removed",
                       help="Shapley: an absent unit is deleted (removed, default) or each of "
                            "its tokens replaced by --filler")
    units.add_argument("--filler", default="pad", metavar="TOKEN",
                       help="pad (default), mask, or a text of one token")
    units.add_argument("--compression", action="store_true",
                       help="also the compression curve (FrugalPrompt): the target with only "
                            "the top, bottom or random k%% of units, table attribution_curves")
    units.add_argument("--rank-by", choices=UNIT_METHODS, metavar="METHOD",
                       help="the method that ranks units for --compression (default: shapley, "
                            "else integrated_gradients, ... the first computed)")
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
    if unit_mode(args):
        return cmd_attribute_units(args, prompts)
    methods = METHODS if "both" in args.method else tuple(args.method)
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


def unit_mode(args: argparse.Namespace) -> bool:
    """Attribution to units (table unit_attributions) rather than per-token ablation."""
    return (any(m in (*GRADIENT_OR_GAME, "all") for m in args.method) or args.units is not None
            or args.options is not None or args.compression or args.delimiter is not None)


def cmd_attribute_units(args: argparse.Namespace, prompts: list[str]) -> int:
    """`tokenprobe attribute` in unit mode; returns the exit code."""
    import tokenprobe
    from tokenprobe.analyses.unit_attribution import UnitAttributionConfig, unit_attribution_run
    from tokenprobe.cli.args import EXIT_OK, UsageError
    from tokenprobe.store import check_target

    methods = sorted({m for name in args.method for m in (
        UNIT_METHODS if name == "all" else METHODS if name == "both" else (name,))},
        key=UNIT_METHODS.index)
    if args.target is not None and args.options is not None:
        raise UsageError("give --target or --options, not both")
    if args.window is not None or (args.layers and len(args.layers) > 1):
        raise UsageError("unit mode knocks units out of one layer set: give --layers SET once, "
                         "without --window")
    try:
        config = UnitAttributionConfig(
            methods=tuple(methods), units=args.units or "word", delimiter=args.delimiter,
            ig_steps=args.ig_steps, baseline=args.baseline, permutations=args.permutations,
            seed=args.seed, absent=args.absent, filler=args.filler, to=args.to,
            knockout_layers=parse_layer_set(args.layers[0]) if args.layers else None,
            batch_size=args.batch_size, compression=args.compression, rank_by=args.rank_by)
        if config.units == "span" and config.delimiter is None:
            raise ValueError("--units span needs --delimiter TEXT (or use the Python API's "
                             "spans)")
        if args.permutations is not None and args.permutations % 2:
            raise ValueError("--permutations counts antithetic pairs' members: give an even N")
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded = tokenprobe.load(args.model, device=args.device)
    try:
        run = unit_attribution_run(
            loaded, prompts, config, continuations=[args.target] * len(prompts),
            options=tuple(args.options) if args.options else None, progress=not args.quiet,
            out=args.out, overwrite=args.overwrite)
    except ValueError as err:  # a bad baseline or filler, too many units for exact Shapley
        raise UsageError(str(err)) from err
    print_unit_summary(run)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(run.meta['tables'])})")
    return EXIT_OK


def print_unit_summary(run: Run, top: int = 3) -> None:
    """Per prompt: the target and its value, each method's top units (with standard errors
    where sampled), and the compression curve's top-k values."""
    from tokenprobe.analyses.views import readable_token

    print(f"model {run.meta['model']}, {len(run.prompts)} prompt(s)")
    table = run.unit_attributions
    curves = run.tables.get("attribution_curves")
    for item in run.meta["summary"]["unit_attribution"]:
        pid = item["prompt_id"]
        text = run.prompts.set_index("prompt_id").text[pid]
        head = (text[:48] + "...") if len(text) > 48 else text
        print(f"  [{pid}] {head!r}: {item['target']} = {item['target_value']:.3f} nats, "
              f"{item['n_units']} {item['units']} unit(s)"
              + (f", IG completeness gap {item['ig_gap']:+.4f}" if "ig_gap" in item else ""))
        for method, group in table[table.prompt_id == pid].groupby("method", sort=False):
            best = group.reindex(group.value.abs().sort_values(ascending=False).index)[:top]
            shown = ", ".join(
                f"{readable_token(t)!r} {v:+.3f}" + (f" ± {e:.3f}" if e > 0 else "")
                for t, v, e in zip(best.text, best.value, best.se))
            print(f"        {method:<21} {shown}")
        if curves is not None:
            mine = curves[(curves.prompt_id == pid) & (curves.order == "top")]
            print("        compression (top-k by " + str(mine.ranking.iat[0]) + "): " + ", ".join(
                f"{f:.0%} {v:.2f}" for f, v in zip(mine.keep_fraction, mine.value)))
