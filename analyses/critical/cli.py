"""`tokenprobe critical`: the command line of the critical-token search (its `search` module)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprobe.analyses.critical.rule import CriticalConfig
from tokenprobe.analyses.critical.search import critical_search
from tokenprobe.analyses.critical.tasks import load_tasks
from tokenprobe.store import Run
from tokenprobe.tokens import display_text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `critical` subcommand to `subparsers`; its handler is `cmd_critical`."""
    from tokenprobe.cli.args import (EXIT_CODES, RESUME_NOTE, add_model_argument,
                                     add_run_dir_arguments, nonnegative_float, positive_int, seed)

    d = CriticalConfig()
    resume = RESUME_NOTE.replace("batches", "prefixes")
    p = subparsers.add_parser(
        "critical", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="critical tokens of wrong answers by rollout search with a verifier (cDPO)",
        description="Critical-token search (Lin et al., \"Critical Tokens Matter\"): for each\n"
                    "task, sample a trajectory the verifier rejects, sample --rollouts\n"
                    "continuations of its prefixes, and flag the first token after which none\n"
                    "is correct (a later prefix with more than 3 correct resets the search);\n"
                    "then draw --counterfactual-draws replacements of that token at temperature\n"
                    "1 with its own probability set to 0 and roll each out once (the authors'\n"
                    "code). Answers are graded as their GSM8K code does (final_number). Prefixes\n"
                    "are scanned from the end and those the rule no longer needs are skipped.\n"
                    f"The paper samples 64 rollouts per prefix; the default here is "
                    f"{d.n_rollouts}, for CPUs.\n"
                    "Each sampled prefix is checkpointed beside --out: run the same command\n"
                    "again after an interruption and completed prefixes are not sampled again.",
        epilog="example:\n  tokenprobe critical --task arithmetic --limit 3 --rollouts 8 "
               "--out runs/crit\n\ntask files: JSONL, one "
               '{"id", "question", "answer", "verifier": "final_number" | "exact_string" | '
               '"regex"} per line\n(optional "trajectory", "pattern"); "arithmetic" is the '
               "shipped set.\n\n" + EXIT_CODES.replace(RESUME_NOTE, resume))
    add_model_argument(p)
    p.add_argument("--task", default="arithmetic", metavar="FILE",
                   help="task file (.jsonl) or `arithmetic` (the shipped set; default)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N tasks")
    p.add_argument("--rollouts", type=positive_int, default=d.n_rollouts, metavar="N",
                   help=f"continuations per prefix (default {d.n_rollouts}; the paper uses 64)")
    p.add_argument("--temperature", type=nonnegative_float, default=d.temperature,
                   help=f"rollout temperature, of the prefix rollouts and of the rollout after "
                        f"each counterfactual replacement (default {d.temperature}). The "
                        "authors' code sets it per dataset and model (get_model_sampling_config "
                        "in src/configs/data_config.py), GSM8K: 0.5 for Llama-3-8B, 0.85 for "
                        "Llama-3-70B, 1.0 for deepseek-math-7b-base, 0.9 for Qwen2.5-7B, 1.1 "
                        "for Qwen2.5-32B; MATH: 0.1, 0.15, 0.3, 0.5, 0.7. Choose it for your "
                        "model; run.json and the summary record it")
    p.add_argument("--scan", choices=["backward", "all"], default=d.scan,
                   help="backward: skip prefixes the search rule no longer needs (default); "
                        "all: sample every prefix (a full success curve)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help=f"length limit of a rollout (default {d.max_new_tokens})")
    p.add_argument("--attempts", type=positive_int, default=d.trajectory_attempts,
                   help="trajectories sampled per task (temperature "
                        f"{d.trajectory_temperature}) until one is wrong "
                        f"(default {d.trajectory_attempts})")
    p.add_argument("--max-trajectory-tokens", type=positive_int, default=d.max_trajectory_tokens,
                   help=f"length limit of a sampled trajectory (default {d.max_trajectory_tokens})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"rollouts decoded together, from one or several prefixes "
                        f"(default {d.batch_size})")
    p.add_argument("--window", type=positive_int, default=d.window, metavar="K",
                   help=f"prefixes sampled together: the next K positions of the scan share "
                        f"one forward and fill decode batches together; the backward scan may "
                        f"then sample up to K - 1 positions it did not need, which cannot "
                        f"change the critical token (default {d.window}; 1 samples one "
                        f"prefix at a time)")
    p.add_argument("--no-counterfactual", action="store_true",
                   help="skip the counterfactual resampling check")
    p.add_argument("--counterfactual-draws", type=positive_int, default=d.counterfactual_draws,
                   metavar="N",
                   help=f"replacement tokens drawn at the critical token, from the temperature-"
                        f"{d.counterfactual_temperature:g} softmax without the original token, "
                        f"each rolled out once (default {d.counterfactual_draws}, the authors')")
    p.add_argument("--seed", type=seed, default=d.seed,
                   help="base seed; each rollout's seed derives from it and is in the "
                        "rollouts table (default 0)")
    add_run_dir_arguments(p)
    p.set_defaults(func=cmd_critical, on_interrupt=resume)
    return p


def cmd_critical(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe critical`; returns the exit code."""
    import tokenprobe
    from tokenprobe.cli.args import EXIT_OK, UsageError
    from tokenprobe.store import check_target

    try:
        tasks = load_tasks(args.task)[:args.limit]
        config = CriticalConfig(n_rollouts=args.rollouts, temperature=args.temperature,
                                scan=args.scan, max_new_tokens=args.max_new_tokens,
                                trajectory_attempts=args.attempts, batch_size=args.batch_size,
                                window=args.window,
                                max_trajectory_tokens=args.max_trajectory_tokens,
                                counterfactual=not args.no_counterfactual,
                                counterfactual_draws=args.counterfactual_draws, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    loaded = tokenprobe.load(args.model, device=args.device)
    run = critical_search(loaded, tasks, config, out=args.out, overwrite=args.overwrite,
                          progress=not args.quiet)
    print_summary(run)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(run.meta['tables'])})")
    return EXIT_OK


def print_summary(run: Run) -> None:
    """One line per task: the critical token, success before / at it, the counterfactual;
    first the temperature of each stage."""
    config = run.meta["config"]
    n = config["n_rollouts"]
    print(f"model {run.meta['model']}, {len(run.meta['tasks'])} task(s), n = {n} rollouts "
          f"per prefix, temperature {config['temperature']}")
    sampled = any(t.get("trajectory") is None for t in run.meta["tasks"])
    stages = ([f"sampled trajectories {config['trajectory_temperature']}"] if sampled else []) \
        + [f"prefix rollouts {config['temperature']}"]
    if config["counterfactual"] and "counterfactual_draws" in config:
        stages.append(f"counterfactual: {config['counterfactual_draws']} replacements at "
                      f"{config['counterfactual_temperature']}, each rolled out once at "
                      f"{config['temperature']}")
    print(f"temperatures: {'; '.join(stages)}")
    for item in run.meta["summary"]["critical"]:
        head = f"  [{item['prompt_id']}] {display_text(str(item['task_id'])):<10}"
        if item["status"] != "critical":
            print(f"{head} {item['status']} ({item['prefixes_sampled']} prefixes sampled)")
            continue
        before = ("n/a" if item["success_before"] is None else f"{item['success_before']:.2f}")
        cf = item.get("counterfactual_success")
        print(f"{head} critical {item['critical_token']!r} at token "
              f"{item['critical_index']} of {item['trajectory_tokens']}: success {before} before,"
              f" {item['success_at']:.2f} after"
              + ("" if cf is None else f", counterfactual {cf:.2f}")
              + f" ({item['prefixes_sampled']} prefixes sampled)")
