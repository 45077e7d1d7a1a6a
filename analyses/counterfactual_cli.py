"""`tokenprobe counterfactual`: Gumbel-max counterfactual generation (counterfactual.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.counterfactual import GumbelConfig, Intervention
from tokenprobe.store import Run


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `counterfactual` subcommand to `subparsers`; its handler is `cmd_counterfactual`."""
    from tokenprobe.cli.args import (EXIT_CODES_NO_RESUME, NOTHING_WRITTEN, add_model_argument,
                                     add_run_dir_arguments, positive_float, positive_int, seed)

    d = GumbelConfig()
    p = subparsers.add_parser(
        "counterfactual", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="counterfactual generation with a Gumbel-max causal model (Chatzi et al.)",
        description="Counterfactual token generation (Chatzi et al. 2024): sample a factual\n"
                    "continuation of --prompt as argmax(z / T + g) with Gumbel noise g drawn\n"
                    "from --seed, then, for each --intervene STEP=TOKEN, force that token at\n"
                    "that generation step and regenerate every later step with the same\n"
                    "noise: what the model would have written had the token been different,\n"
                    "all else equal. --counterfactual-prompt intervenes on the prompt instead.\n"
                    "Writes the tables prompts, tokens, counterfactuals (factual vs\n"
                    "counterfactual token per step) and generations (one row per\n"
                    "intervention).",
        epilog="examples:\n"
               '  tokenprobe counterfactual --prompt "The capital of France is" '
               "--max-new-tokens 12 \\\n      --seed 3 --intervene '0= Rome' "
               "--intervene '2=#13' --out runs/cf\n"
               '  tokenprobe counterfactual --prompt "My dog is" '
               '--counterfactual-prompt "My cat is" --out runs/cf2\n\n'
               "STEP is 0-based over generated tokens (negative: from the end of the factual\n"
               "generation, written --intervene=-1=TOKEN); TOKEN is text that is exactly one\n"
               "token (mind leading spaces) or #ID for a token id.\n\n" + EXIT_CODES_NO_RESUME)
    add_model_argument(p)
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the factual prompt (tokenised with the tokenizer's special tokens)")
    p.add_argument("--intervene", action="append", metavar="STEP=TOKEN", default=[],
                   help="a token intervention; repeat for several (one generation each)")
    p.add_argument("--counterfactual-prompt", metavar="TEXT",
                   help="an intervention on the prompt: regenerate from TEXT with the factual "
                        "noise (one more generation)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help=f"generation steps at most (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=positive_float, default=d.temperature,
                   help=f"T in argmax(z / T + g) (default {d.temperature}: the model's own "
                        "distribution)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the Gumbel noise; the same seed gives the same generations "
                        "(default 0)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep generating after EOS")
    add_run_dir_arguments(p)
    p.set_defaults(func=cmd_counterfactual, on_interrupt=NOTHING_WRITTEN)
    return p


def split_intervention(spec: str, max_new_tokens: int) -> tuple[int, str]:
    """'STEP=TOKEN' -> (step, TOKEN), checked without a model: STEP an integer that can name a
    step of a generation of at most `max_new_tokens` tokens (negative: from its end).

    Raises:
        ValueError: a malformed spec, or a step no generation that long has.
    """
    step, sep, token = spec.partition("=")
    try:
        step_i = int(step)
    except ValueError:
        raise ValueError(f"bad --intervene {spec!r}: expected STEP=TOKEN, STEP an integer") \
            from None
    if not sep or token == "":
        raise ValueError(f"bad --intervene {spec!r}: expected STEP=TOKEN")
    if not -max_new_tokens <= step_i < max_new_tokens:
        raise ValueError(f"--intervene {spec!r}: step {step_i} is outside any generation of "
                         f"--max-new-tokens {max_new_tokens} (steps 0 to {max_new_tokens - 1}, "
                         f"or -1 to -{max_new_tokens} from the end)")
    return step_i, token


def parse_intervention(spec: str, tokenizer, max_new_tokens: int) -> tuple[int, int]:
    """'STEP=TOKEN' -> (step, token id); TOKEN is one token's text or '#ID'.

    Raises:
        ValueError: a malformed spec or step (`split_intervention`), an unknown id, or text
            that is not exactly one token.
    """
    step_i, token = split_intervention(spec, max_new_tokens)
    if token.startswith("#") and token[1:].isdigit():
        token_id = int(token[1:])
        if token_id >= len(tokenizer):
            raise ValueError(f"--intervene {spec!r}: token id {token_id} outside the "
                             f"vocabulary (size {len(tokenizer)})")
        return step_i, token_id
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"--intervene {spec!r}: {token!r} is {len(ids)} tokens {pieces}, not "
                         "one; give a single token's text or #ID")
    return step_i, int(ids[0])


def cmd_counterfactual(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe counterfactual`; returns the exit code."""
    import tokenprobe
    from tokenprobe.analyses.counterfactual import counterfactual_run
    from tokenprobe.cli.args import EXIT_OK, UsageError
    from tokenprobe.store import check_target
    from tokenprobe.tokens import check_nonempty

    check_nonempty([args.prompt] + ([args.counterfactual_prompt]
                                    if args.counterfactual_prompt is not None else []))
    if not args.intervene and args.counterfactual_prompt is None:
        raise UsageError("give at least one --intervene STEP=TOKEN or --counterfactual-prompt")
    try:
        config = GumbelConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              stop_at_eos=not args.no_eos_stop)
        for spec in args.intervene:  # the step of each, before the model loads
            split_intervention(spec, config.max_new_tokens)
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded = tokenprobe.load(args.model, device=args.device)
    try:
        queries = [Intervention(args.prompt, args.seed,
                                *parse_intervention(s, loaded.tokenizer, config.max_new_tokens))
                   for s in args.intervene]
        if args.counterfactual_prompt is not None:
            queries.append(Intervention(args.prompt, args.seed,
                                        counterfactual_prompt=args.counterfactual_prompt))
        run = counterfactual_run(loaded, queries, config, progress=not args.quiet,
                                 out=args.out, overwrite=args.overwrite)
    except ValueError as err:  # a step outside the factual generation
        raise UsageError(str(err)) from err
    print_summary(run)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(run.meta['tables'])})")
    return EXIT_OK


def print_summary(run: Run) -> None:
    """The factual text, then per intervention the counterfactual text and where it departs."""
    gens = run.generations
    print(f"model {run.meta['model']}, seed {int(gens.seed.iat[0])}, temperature "
          f"{float(gens.temperature.iat[0])}")
    print(f"  prompt        {gens.prompt.iat[0]!r}")
    print(f"  factual       {gens.factual_text.iat[0]!r}")
    for row in gens.itertuples(index=False):
        what = ("" if _isna(row.counterfactual_prompt)
                else f"prompt := {row.counterfactual_prompt!r}")
        if not _isna(row.intervention_step):
            steps = run.counterfactuals
            token = steps[(steps.generation_id == row.generation_id)
                          & steps.intervened].counterfactual_token
            what = (f"step {row.intervention_step} := {token.iat[0]!r}" if len(token)
                    else f"step {row.intervention_step}") + (f", {what}" if what else "")
        first = ("identical" if _isna(row.first_difference)
                 else f"first differs at step {row.first_difference}")
        print(f"  [{row.generation_id}] {what}: {row.counterfactual_text!r} ({first})")


def _isna(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))
