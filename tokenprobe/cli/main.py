"""The `tokenprobe` command: the parser over every subcommand and `main` (the entry point).

`run` is in `tokenprobe.cli.run`, `models` and `query` in `tokenprobe.cli.query`, `selftest` in
`tokenprobe.cli.selftest`; the other subcommands' parsers live with their analyses (`LAZY`) and
load only when asked for. What they all share (exit codes, argument types, `UsageError`) is
`tokenprobe.cli.args`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from tokenprobe.cli import query
from tokenprobe.cli.args import (EXIT_CODES, EXIT_EXISTS, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK,
                                 EXIT_USAGE, UsageError)


# Subcommands whose parsers need heavy modules (`run`: every registered probe's options; the
# others live with their analyses): imported only when asked for, so `tokenprobe --help`
# loads none of them.
LAZY = {
    "run": ("tokenprobe.cli.run", "run probes over prompts and save the tables"),
    "heads": ("tokenprobe.analyses.heads_cli",
              "active vs dormant heads: loss change when each head is ablated, per domain"),
    "toy": ("tokenprobe.analyses.toy",
            "train and probe the Bigram-Backcopy toy models (Guo et al.)"),
    "critical": ("tokenprobe.analyses.critical.cli",
                 "critical tokens of wrong answers by rollout search with a verifier (cDPO)"),
    "attribute": ("tokenprobe.analyses.attribution_cli",
                  "how much each prompt token or unit matters to a target (ablation, gradients, "
                  "Shapley values)"),
    "counterfactual": ("tokenprobe.analyses.counterfactual_cli",
                       "counterfactual generation with a Gumbel-max causal model (Chatzi et al.)"),
    "spans": ("tokenprobe.analyses.spans_cli",
              "compare two models with different tokenisers on character spans (surprisal)"),
    "app": ("tokenprobe.app.cli", "the Streamlit dashboard over a directory of runs"),
    "report": ("tokenprobe.analyses.report_cli", "HTML report, static figures, LaTeX tables"),
    "selftest": ("tokenprobe.cli.selftest",
                 "check every kernel implementation against the float64 reference on a device"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; `command` names the subcommand about to run (its lazy parser is built)."""
    parser = argparse.ArgumentParser(
        prog="tokenprobe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Token-level interpretability: probes reduced inside the forward pass, "
                    "tidy tables out.", epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)

    def lazy(name: str) -> None:
        module, summary = LAZY[name]
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)

    lazy("run")
    query.add_models_parser(sub)
    query.add_tables_parser(sub)
    query.add_query_parser(sub)
    for name in [n for n in LAZY if n != "run"]:
        lazy(name)
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
