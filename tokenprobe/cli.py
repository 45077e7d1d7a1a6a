"""The `tokenprobe` command line: run probes, list models, query runs."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from tokenprobe.options import (UsageError, add_model_argument, add_prompt_arguments,
                                add_run_dir_arguments, finite_float, gather_prompts,
                                positive_int, seed)

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


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import tokenprobe
    from tokenprobe.probes import EntropyConfig, EntropyProbe, make_probes
    from tokenprobe.store import check_target

    prompts = gather_prompts(args)
    names = [p.strip() for p in args.probes.split(",")] if args.probes else None
    try:
        chosen = make_probes(names)  # unknown names fail before the model loads
        entropy_config = EntropyConfig(lens=args.lens, contrast_beta=args.contrast_beta,
                                       quantiles_over=args.quantiles)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.backend != "hf" and names is None:
        chosen = [p for p in chosen if "attention" not in p.sites]
    has_entropy = any(p.name == "entropy" for p in chosen)
    if not has_entropy and (args.compare or args.lens or args.contrast_beta is not None):
        raise UsageError("--compare, --contrast-beta and --lens belong to the entropy probe; "
                         "add it to --probes")
    if args.contrast_beta is not None and not args.compare:
        raise UsageError("--contrast-beta needs --compare NEGATIVE_MODEL (cDPO contrasts the "
                         "probed model with a model tuned on incorrect answers)")
    needs_hf = [p.name for p in chosen if "attention" in p.sites]
    if names and needs_hf and args.backend != "hf":
        raise UsageError(f"probe(s) {', '.join(needs_hf)} read attention inside the transformers "
                         f"attention call and cannot run with --backend {args.backend}; drop "
                         "--backend or those probes")
    check_target(Path(args.out), overwrite=args.overwrite)
    dtype = getattr(torch, args.dtype)
    loaded = tokenprobe.load(args.model, dtype=dtype, device=args.device)
    compare = tokenprobe.load(args.compare, dtype=dtype, device=args.device) if args.compare else None
    probes = [EntropyProbe(entropy_config, compare=compare) if p.name == "entropy" else p
              for p in chosen]
    model = loaded
    if args.backend != "hf":
        from tokenprobe import backends
        model = backends.as_bridge(loaded) if args.backend == "bridge" else backends.as_nnsight(loaded)
    try:
        result = tokenprobe.run(model, prompts, probes, tokenizer=loaded.tokenizer,
                                batch_size=args.batch_size, truncate=args.truncate,
                                max_tokens=args.max_tokens, out=args.out,
                                overwrite=args.overwrite, progress=not args.quiet, seed=args.seed)
    except ValueError as err:  # e.g. a compare model over another vocabulary
        raise UsageError(str(err)) from err
    print_summary(result)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(result.meta['tables'])})")
    for warning in result.meta.get("warnings", []):
        print(f"tokenprobe: warning: {warning}", file=sys.stderr)
    return EXIT_NONFINITE if args.strict and result.meta.get("warnings") else EXIT_OK


def print_summary(result) -> None:
    """Per prompt: tokens, massive activations, sink rate and secondary sinks (what ran)."""
    import pandas as pd

    from tokenprobe.analyses.massive import massive_summary
    from tokenprobe.analyses.sinks import sink_rate

    tables = result.tables
    texts = result.prompts.set_index("prompt_id").text
    massive = massive_summary(result).set_index("prompt_id") if "massive" in tables else None
    rates = sink_rate(result).set_index("prompt_id") if "heads" in tables else None
    print(f"model {result.meta['model']} ({result.meta['n_layers']} blocks), "
          f"{len(texts)} prompt(s)")
    for prompt_id, text in texts.items():
        n = int(result.prompts.set_index("prompt_id").n_tokens[prompt_id])
        head = (text[:48] + "...") if len(text) > 48 else text
        print(f"  [{prompt_id}] {n:4d} tokens  | {head!r}")
        if massive is not None:
            row = massive.loc[prompt_id]
            if pd.isna(row.first_massive_layer):
                print("        no massive activations")
            else:
                print(f"        massive from block {row.first_massive_layer} to "
                      f"{row.last_massive_layer}, dims [{row.massive_dims}] at positions "
                      f"[{row.massive_positions}], max |h| {row.max_massive:,.0f}")
        if rates is not None and rates.nonfinite_heads[prompt_id]:
            print(f"        sink rate n/a: sink mass is NaN or inf at "
                  f"{rates.nonfinite_heads[prompt_id]} (layer, head) pair(s)")
        elif rates is not None:
            rate = rates.loc[prompt_id]
            sinks = tables["sinks"][(tables["sinks"].prompt_id == prompt_id)]
            secondary = sinks[sinks.kind == "secondary"]
            found = ", ".join(f"{t!r}@{p} (layers {c}-{c + life - 1})" for t, p, c, life in
                              zip(secondary.token, secondary.pos, secondary.creation_layer,
                                  secondary.lifetime)) or "none"
            print(f"        sink rate {rate.sink_rate:.1f}% (eps {rate.eps}, T={int(rate['T'])}); "
                  f"secondary sinks: {found}")
        if "entropy" in tables["tokens"]:
            print_entropy(result, prompt_id)


def print_entropy(result, prompt_id: int, top: int = 3) -> None:
    """One prompt's mean entropy, self-certainty, perplexity and its top forking tokens."""
    import numpy as np
    import pandas as pd

    row = result.prompts.set_index("prompt_id").loc[prompt_id]
    if row.n_tokens < 2:
        print("        entropy: nothing to score (one token)")
        return
    if pd.isna(row.mean_entropy):
        scored = result.tokens[(result.tokens.prompt_id == prompt_id) & (result.tokens.pos > 0)]
        bad = int((~np.isfinite(scored.entropy.to_numpy(float))).sum())
        print(f"        entropy n/a: NaN or inf at {bad} of {len(scored)} scored positions")
        return
    tokens = result.tokens[(result.tokens.prompt_id == prompt_id) & result.tokens.forking.fillna(False)]
    forks = ", ".join(f"{t!r}@{p} (H {h:.2f})" for t, p, h in
                      tokens.nlargest(top, "entropy")[["token", "pos", "entropy"]].itertuples(
                          index=False)) or "none"
    line = (f"        entropy {row.mean_entropy:.2f} nats, self-certainty "
            f"{row.mean_self_certainty:.2f}, perplexity {row.perplexity:.1f}; forking: {forks}")
    if "jsd" in result.tokens:
        jsd = result.tokens[result.tokens.prompt_id == prompt_id].jsd.mean()
        compare = next(p["compare"]["model"] for p in result.meta["probes"] if "compare" in p)
        line += f"; mean JSD to {compare} {jsd:.3f}"
    print(line)


def cmd_models(args: argparse.Namespace) -> int:
    from tokenprobe.models import REGISTRY, describe

    rows = [describe(name) for name in REGISTRY]
    cols = ["name", "layers", "heads", "kv_heads", "width", "vocab", "context", "weights"]
    table = [[str(r.get(c, "?")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from tokenprobe.query import QueryError, query

    try:
        frame = query(args.sql, args.runs)
    except QueryError as err:
        raise UsageError(str(err)) from err
    except duckdb.Error as err:
        raise UsageError(f"SQL error: {err}") from err
    if args.format == "json":  # JSON escapes control characters itself (and all non-ASCII)
        print(frame.to_json(orient="records", indent=1))
        return EXIT_OK
    frame = printable(frame)
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        print(frame.to_string(index=False, max_rows=args.max_rows))
    return EXIT_OK


def printable(frame):
    """`frame` with control characters in its text cells and column names escaped
    (`tokens.display_text`), so that printing it never drives the terminal."""
    from tokenprobe.tokens import display_text

    def escape(value):
        if isinstance(value, str):
            return display_text(value)
        if isinstance(value, bytes):
            return display_text(value.decode("utf-8", errors="backslashreplace"))
        return value

    import pandas as pd

    out = frame.rename(columns=lambda c: display_text(str(c)))
    for column in out.columns[[dtype == object or pd.api.types.is_string_dtype(dtype)
                               for dtype in out.dtypes]]:
        out[column] = out[column].map(escape)
    return out


# Subcommands whose parsers live with their (heavy) analysis modules: imported only when asked
# for, so `tokenprobe --help` and `tokenprobe run` do not load them.
LAZY = {
    "heads": ("tokenprobe.analyses.heads_cli",
              "active vs dormant heads: loss change when each head is ablated, per domain"),
    "toy": ("tokenprobe.analyses.toy",
            "train and probe the Bigram-Backcopy toy models (Guo et al.)"),
    "critical": ("tokenprobe.analyses.critical_cli",
                 "critical tokens of wrong answers by rollout search with a verifier (cDPO)"),
    "attribute": ("tokenprobe.analyses.attribution_cli",
                  "attribution by ablation: how much each prompt token matters to a target"),
    "counterfactual": ("tokenprobe.analyses.counterfactual_cli",
                       "counterfactual generation with a Gumbel-max causal model (Chatzi et al.)"),
    "app": ("tokenprobe.app.cli", "the Streamlit dashboard over a directory of runs"),
    "report": ("tokenprobe.analyses.report_cli", "HTML report, static figures, LaTeX tables"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; `command` names the subcommand about to run (its lazy parser is built)."""
    parser = argparse.ArgumentParser(
        prog="tokenprobe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Token-level interpretability: probes reduced inside the forward pass, "
                    "tidy tables out.", epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        help="run probes over prompts and save the tables",
        description="Run probes over prompts on a model and save a run directory (run.json + "
                    "one Parquet file per table). Finished batches are checkpointed next to "
                    "--out; an interrupted run resumes when the same command is run again.")
    add_model_argument(run)
    run.add_argument("--probes", help="comma-separated probe names (default: all of "
                                      "activations,sinks,entropy; with --backend "
                                      "bridge|nnsight: activations,entropy)")
    add_prompt_arguments(run)
    add_run_dir_arguments(run)
    run.add_argument("--truncate", action="store_true",
                     help="cut prompts longer than the model's context instead of refusing them")
    run.add_argument("--max-tokens", type=positive_int, metavar="T",
                     help="keep the first T tokens of every prompt (Gu et al. report the sink "
                          "rate at T=64)")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="prompts per forward (default 8)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--backend", default="hf", choices=["hf", "bridge", "nnsight"],
                     help="hook through transformers (default), a TransformerLens "
                          "TransformerBridge, or an nnsight LanguageModel")
    entropy = run.add_argument_group("entropy probe")
    entropy.add_argument("--compare", metavar="MODEL",
                         help="a second model over the same vocabulary: adds teacher entropy, "
                              "KL both ways, JSD and the TIP quadrant per token (the probed "
                              "model is the student)")
    entropy.add_argument("--contrast-beta", type=finite_float, metavar="BETA",
                         help="with --compare NEGATIVE_MODEL: cDPO's contrastive score "
                              "critical_ce = softmax((1+BETA) z - BETA z_neg)[token] (paper: 1)")
    entropy.add_argument("--lens", action="store_true",
                         help="logit lens per layer (lens_entropy, lens_kl_to_final in "
                              "token_layers); one more vocabulary pass per layer")
    entropy.add_argument("--quantiles", choices=["run", "prompt"], default="run",
                         help="entropy bands and forking tokens from quantiles over the whole "
                              "run (default) or each prompt")
    run.add_argument("--seed", type=seed, default=0, help="torch seed, recorded in run.json")
    run.add_argument("--strict", action="store_true",
                     help=f"exit {EXIT_NONFINITE} when the run holds NaN or inf values (e.g. "
                          "float16 overflow); without it they are a warning. The run is saved "
                          "either way")
    run.set_defaults(func=cmd_run, on_interrupt=RESUME_NOTE)

    models = sub.add_parser("models", help="list registered models and whether weights are present",
                            description="List registered models: layers, heads, width, vocab, "
                                        "context, and whether weights are cached.")
    models.set_defaults(func=cmd_models)

    query = sub.add_parser(
        "query", help="SQL over run directories (DuckDB)",
        description="Run DuckDB SQL over one or more run dirs. Each table (prompts, tokens, "
                    "token_layers, massive, ...) is a view with a leading `run` column. Read-only "
                    "and sandboxed: only SELECT statements (WITH, VALUES, DESCRIBE, SHOW, "
                    "SUMMARIZE too; not EXPLAIN), and no file but the run tables can be read.",
        epilog='example: tokenprobe query "SELECT run, layer, max(value) FROM massive GROUP BY '
               'ALL" runs/a runs/b')
    query.add_argument("sql")
    query.add_argument("runs", nargs="+", metavar="RUN_DIR")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table",
                       help="table (default) and csv print control characters in text as "
                            "escapes (\\n, \\x1b, ...); json escapes them as JSON does, "
                            "exactly")
    query.add_argument("--max-rows", type=positive_int, default=60,
                       help="rows shown in table format (default 60)")
    query.set_defaults(func=cmd_query)

    for name, (module, summary) in LAZY.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in LAZY else None).parse_args(argv)
    from tokenprobe.models import ModelError
    from tokenprobe.store import OutputNotWritableError, RunExistsError, RunNotFoundError
    from tokenprobe.tokens import PromptError

    try:
        return args.func(args)
    except (UsageError, PromptError, RunNotFoundError, OutputNotWritableError) as err:
        print(f"tokenprobe: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ModelError as err:
        print(f"tokenprobe: error: {err}", file=sys.stderr)
        return EXIT_MODEL
    except (RunExistsError, FileExistsError) as err:
        print(f"tokenprobe: error: {err}", file=sys.stderr)
        return EXIT_EXISTS
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:  # what is kept is the subcommand's to say (set_defaults)
        note = getattr(args, "on_interrupt", None)
        print(f"\ntokenprobe: interrupted{f'; {note}' if note else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
