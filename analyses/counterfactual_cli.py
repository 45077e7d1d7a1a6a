"""`tokenprobe counterfactual`: Gumbel-max counterfactual generation (counterfactual.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.counterfactual import SAMPLE, SAMPLERS, GumbelConfig, Intervention
from tokenprobe.store import Run

TOP_P, TOP_K = 0.9, 10  # the authors' defaults (src/single_query.py; their stories use k = 5)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `counterfactual` subcommand to `subparsers`; its handler is `cmd_counterfactual`."""
    from tokenprobe.cli.args import (EXIT_CODES_NO_RESUME, NOTHING_WRITTEN, add_model_argument,
                                     add_run_dir_arguments, checked, positive_float,
                                     positive_int, seed)

    mass = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")

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
                    "--sampler top_p / top_k restrict the argmax to the nucleus / the k most\n"
                    "probable tokens, the noise still drawn over the whole vocabulary and\n"
                    "tied to token ids (the authors' src/sampler.py), so the counterfactual\n"
                    "keeps each token's noise. --replacement sample draws the intervened\n"
                    "token as the authors' code does instead of taking it from --intervene.\n"
                    "Writes the tables prompts, tokens, counterfactuals (factual vs\n"
                    "counterfactual token per step) and generations (one row per\n"
                    "intervention).",
        epilog="examples:\n"
               '  tokenprobe counterfactual --prompt "The capital of France is" '
               "--max-new-tokens 12 \\\n      --seed 3 --intervene '0= Rome' "
               "--intervene '2=#13' --out runs/cf\n"
               '  tokenprobe counterfactual --prompt "My dog is" '
               '--counterfactual-prompt "My cat is" --out runs/cf2\n'
               '  tokenprobe counterfactual --prompt "Tell me a story." --temperature 0.9 '
               "--sampler top_p \\\n      --replacement sample --intervene 5 --out runs/cf3"
               "   # as the authors' stories\n\n"
               "STEP is 0-based over generated tokens (negative: from the end of the factual\n"
               "generation, written --intervene=-1=TOKEN); TOKEN is text that is exactly one\n"
               "token (mind leading spaces) or #ID for a token id. With --replacement sample\n"
               "give --intervene STEP only.\n\n"
               "the authors' settings (github.com/Networks-Learning/counterfactual-llms):\n"
               "temperature 0.6 in src/single_query.py, 0.9 for their stories\n"
               "(scripts/story_query.py); sampler \"vocabulary\" (here full) by default,\n"
               "top-p 0.9, top-k 10 (stories: 5); replacement from top-p 0.9, seed 42.\n\n"
               + EXIT_CODES_NO_RESUME)
    add_model_argument(p)
    p.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the factual prompt (tokenised with the tokenizer's special tokens)")
    p.add_argument("--intervene", action="append", metavar="STEP=TOKEN", default=[],
                   help="a token intervention; repeat for several (one generation each); "
                        "STEP alone with --replacement sample")
    p.add_argument("--replacement", choices=["given", SAMPLE], default="given",
                   help="given: the token of --intervene STEP=TOKEN (default); sample: drawn "
                        "as the authors' Sampler.intervention does, from the top-p nucleus of "
                        "softmax(z / T) at STEP with the factual token removed")
    p.add_argument("--replacement-top-p", type=mass, default=d.replacement_top_p, metavar="P",
                   help=f"the nucleus of --replacement sample (default {d.replacement_top_p}, "
                        "theirs)")
    p.add_argument("--replacement-seed", type=seed, default=d.replacement_seed, metavar="N",
                   help="the seed of --replacement sample, the same for every intervention "
                        f"(default {d.replacement_seed}, theirs)")
    p.add_argument("--counterfactual-prompt", metavar="TEXT",
                   help="an intervention on the prompt: regenerate from TEXT with the factual "
                        "noise (one more generation)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help=f"generation steps at most (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=positive_float, default=d.temperature,
                   help=f"T in argmax(z / T + g) (default {d.temperature}: the model's own "
                        "distribution; the authors use 0.6 for single queries, "
                        "src/single_query.py, and 0.9 for stories, scripts/story_query.py)")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler,
                   help="full: argmax over the whole vocabulary (default; their "
                        "\"vocabulary\"); top_p: over the nucleus (their \"top-p token\"); "
                        "top_k: over the k most probable tokens (their \"top-k token\")")
    p.add_argument("--top-p", type=mass, metavar="P",
                   help=f"the nucleus mass of --sampler top_p (default {TOP_P}, theirs)")
    p.add_argument("--top-k", type=positive_int, metavar="K",
                   help=f"the k of --sampler top_k (default {TOP_K}, theirs in "
                        "src/single_query.py; 5 for their stories)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the Gumbel noise; the same seed gives the same generations "
                        "(default 0)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep generating after EOS")
    add_run_dir_arguments(p)
    p.set_defaults(func=cmd_counterfactual, on_interrupt=NOTHING_WRITTEN)
    return p


def split_intervention(spec: str, max_new_tokens: int, *, sampled: bool = False
                       ) -> tuple[int, str | None]:
    """'STEP=TOKEN' -> (step, TOKEN), or 'STEP' -> (step, None) when `sampled` (--replacement
    sample), checked without a model: STEP an integer that can name a step of a generation of
    at most `max_new_tokens` tokens (negative: from its end).

    Raises:
        ValueError: a malformed spec, or a step no generation that long has.
    """
    step, sep, token = spec.partition("=")
    expected = "STEP (--replacement sample)" if sampled else "STEP=TOKEN"
    try:
        step_i = int(step)
    except ValueError:
        raise ValueError(f"bad --intervene {spec!r}: expected {expected}, STEP an integer") \
            from None
    if sampled and sep:
        raise ValueError(f"bad --intervene {spec!r}: expected {expected}; the token is drawn, "
                         "so give none (or drop --replacement sample)")
    if not sampled and (not sep or token == ""):
        raise ValueError(f"bad --intervene {spec!r}: expected STEP=TOKEN")
    if not -max_new_tokens <= step_i < max_new_tokens:
        raise ValueError(f"--intervene {spec!r}: step {step_i} is outside any generation of "
                         f"--max-new-tokens {max_new_tokens} (steps 0 to {max_new_tokens - 1}, "
                         f"or -1 to -{max_new_tokens} from the end)")
    return step_i, None if sampled else token


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
    sampled = args.replacement == SAMPLE
    for name, needed in (("top_p", "top_p"), ("top_k", "top_k")):
        if getattr(args, name) is not None and args.sampler != needed:
            raise UsageError(f"--{name.replace('_', '-')} goes with --sampler {needed} "
                             f"(--sampler is {args.sampler})")
    if sampled and not args.intervene:
        raise UsageError("--replacement sample needs at least one --intervene STEP")
    try:
        config = GumbelConfig(
            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            stop_at_eos=not args.no_eos_stop, sampler=args.sampler,
            top_p=(TOP_P if args.top_p is None else args.top_p)
            if args.sampler == "top_p" else None,
            top_k=(TOP_K if args.top_k is None else args.top_k)
            if args.sampler == "top_k" else None,
            replacement_top_p=args.replacement_top_p, replacement_seed=args.replacement_seed)
        for spec in args.intervene:  # the step of each, before the model loads
            split_intervention(spec, config.max_new_tokens, sampled=sampled)
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded = tokenprobe.load(args.model, device=args.device)
    try:
        queries = [Intervention(args.prompt, args.seed,
                                split_intervention(s, config.max_new_tokens, sampled=True)[0],
                                SAMPLE) if sampled else
                   Intervention(args.prompt, args.seed,
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
    sampler = gens.sampler.iat[0]
    limit = {"top_p": f" p={gens.top_p.iat[0]}", "top_k": f" k={gens.top_k.iat[0]}"}
    print(f"model {run.meta['model']}, seed {int(gens.seed.iat[0])}, temperature "
          f"{float(gens.temperature.iat[0])}, sampler {sampler}{limit.get(sampler, '')}")
    print(f"  prompt        {gens.prompt.iat[0]!r}")
    print(f"  factual       {gens.factual_text.iat[0]!r}")
    for row in gens.itertuples(index=False):
        what = ("" if _isna(row.counterfactual_prompt)
                else f"prompt := {row.counterfactual_prompt!r}")
        if not _isna(row.intervention_step):
            steps = run.counterfactuals
            token = steps[(steps.generation_id == row.generation_id)
                          & steps.intervened].counterfactual_token
            how = " (sampled)" if row.replacement == "sampled" else ""
            what = (f"step {row.intervention_step} := {token.iat[0]!r}{how}" if len(token)
                    else f"step {row.intervention_step}") + (f", {what}" if what else "")
        first = ("identical" if _isna(row.first_difference)
                 else f"first differs at step {row.first_difference}")
        print(f"  [{row.generation_id}] {what}: {row.counterfactual_text!r} ({first})")


def _isna(value) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))
