"""`tokenprobe run`: run probes over prompts, save the run, print a summary per prompt."""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from tokenprobe.cli.args import (EXIT_CODES, EXIT_NONFINITE, EXIT_OK, RESUME_NOTE, UsageError,
                                 add_model_argument, add_placement_arguments,
                                 add_prompt_arguments, add_run_dir_arguments, checked,
                                 corpus_of, nonnegative_float, placement, positive_int, seed)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `run` subcommand to `subparsers`; its handler is `cmd_run`. Every option of every
    registered probe (its Config fields) becomes --PROBE-OPTION."""
    from tokenprobe.backends import BACKENDS
    from tokenprobe.probe import registry

    known = registry()
    run = subparsers.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        help="run probes over prompts and save the tables",
        description="Run probes over prompts on a model and save a run directory (run.json + "
                    "a directory of Parquet part files per table). Prompts are read lazily, "
                    "--window at a time; each finished window is checkpointed next to --out, "
                    "and an interrupted run resumes when the same command is run again.")
    add_model_argument(run)
    by_backend = "; ".join(f"with --backend {name}: {','.join(supported(known, cls.sites))}"
                           for name, cls in BACKENDS.items() if name != "hf")
    run.add_argument("--probes", help=f"comma-separated probe names (default: all of "
                                      f"{','.join(known)}; {by_backend})")
    add_prompt_arguments(run, corpus=True)
    add_run_dir_arguments(run)
    add_placement_arguments(run)
    run.add_argument("--truncate", action="store_true",
                     help="cut prompts longer than the model's context instead of refusing them")
    run.add_argument("--max-tokens", type=positive_int, metavar="T",
                     help="keep the first T tokens of every prompt (Gu et al. report the sink "
                          "rate at T=64)")
    run.add_argument("--batch-size", type=positive_int, default=8,
                     help="prompts per forward (default 8)")
    run.add_argument("--window", type=positive_int, default=256,
                     help="prompts read, sorted by length into batches and checkpointed "
                          "together, one part of every table (default 256)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--backend", default="hf", choices=list(BACKENDS),
                     help="hook through transformers (default), a TransformerLens "
                          "TransformerBridge, or an nnsight TransformersModel")
    run.add_argument("--seed", type=seed, default=0, help="torch seed, recorded in run.json")
    add_engine_arguments(run)
    run.add_argument("--strict", action="store_true",
                     help=f"exit {EXIT_NONFINITE} when the run holds NaN or inf values (e.g. "
                          "float16 overflow); without it they are a warning. The run is saved "
                          "either way")
    with_impl = impl_options(known)
    run.add_argument("--impl", choices=list(dict.fromkeys(c for o in with_impl.values()
                                                          for c in o.choices)),
                     help=f"kernel implementation of every chosen probe with an impl option "
                          f"({', '.join(with_impl)}); --PROBE-impl wins over it. Fast paths "
                          "(flash, triton) run after their first-use self-check")
    run.add_argument("--no-selfcheck", action="store_true",
                     help="skip the first-use self-check of the fast kernel paths (also: "
                          "TOKENPROBE_SELFCHECK=0)")
    for probe in known.values():
        add_probe_options(run, probe)
    run.set_defaults(func=cmd_run, on_interrupt=RESUME_NOTE)
    return run


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine and the Ray engine's options (`tokenprobe.engine_ray.run_ray`)."""
    group = parser.add_argument_group(
        "engine", "where the windows run: in this process (local), or spread over a pool of "
                  "Ray actors, each loading the model once and writing its windows' parts into "
                  "the same run (ray; needs pip install 'tokenprobe[ray]'; on a cluster --out "
                  "must be on a filesystem every node shares)")
    group.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local (default) or ray")
    group.add_argument("--workers", type=positive_int, metavar="N",
                       help="with --engine ray: actors in the pool, each holding a copy of the "
                            "model (default 2)")
    group.add_argument("--gpus-per-worker", type=nonnegative_float, metavar="G",
                       help="with --engine ray: GPUs each actor reserves (default 0: CPU; 1 on a "
                            "GPU cluster, where each actor loads the model on its own GPU: "
                            "leave --device out)")
    group.add_argument("--ray-address", metavar="ADDR",
                       help="with --engine ray: the cluster to join (auto, or "
                            "ray://HEAD:10001); default: start a local Ray")


def supported(known: dict, sites: frozenset[str]) -> list[str]:
    """The probes among `known` that hook only `sites`."""
    return [name for name, cls in known.items() if set(cls.sites) <= sites]


def add_probe_options(parser: argparse.ArgumentParser, probe) -> None:
    """An argument group for `probe`: --NAME-OPTION (and its aliases) for every option."""
    summary = textwrap.fill(" ".join((probe.__doc__ or "").split("\n\n")[0].split()), 76)
    group = parser.add_argument_group(f"{probe.name} probe", summary.replace("%", "%%"))
    for option in probe.options():
        flags = [f"--{probe.name}-{option.name.replace('_', '-')}", *option.aliases]
        default = ",".join(map(str, option.default)) if option.type is tuple else option.default
        help_text = f"{option.help.rstrip('.')} (default: {default})".replace("%", "%%")
        kwargs = {"dest": f"{probe.name}:{option.name}", "default": None, "help": help_text}
        if option.type is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        what = ("one of " + ", ".join(map(str, option.choices)) if option.choices else
                {int: "an integer", float: "a finite number", tuple: "comma-separated integers",
                 "model": "a model name", str: "a text"}[option.type])
        group.add_argument(*flags, type=checked(option.parse, finite, what),
                           metavar="MODEL" if option.type == "model" else option.name.upper(),
                           **kwargs)


def impl_options(probes: dict) -> dict:
    """Probe name -> its `impl` option (its kernel implementation), for the probes with one."""
    found = {n: next((o for o in c.options() if o.name == "impl"), None) for n, c in probes.items()}
    return {n: o for n, o in found.items() if o is not None}


def finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def probe_values(args: argparse.Namespace, probe) -> dict:
    """The options of `probe` given on the command line (name -> value)."""
    prefix = f"{probe.name}:"
    return {dest[len(prefix):]: value for dest, value in vars(args).items()
            if dest.startswith(prefix) and value is not None}


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import tokenprobe
    from tokenprobe.backends import BACKENDS, UnsupportedSite
    from tokenprobe.corpus import CorpusError
    from tokenprobe.placement import PlacementError
    from tokenprobe.probe import registry
    from tokenprobe.store import check_target

    prompts = corpus_of(args)
    known, backend = registry(), BACKENDS[args.backend]
    names = ([p.strip() for p in args.probes.split(",")] if args.probes else
             supported(known, backend.sites))
    unknown = [n for n in names if n not in known]
    if unknown or len(set(names)) != len(names):
        raise UsageError(f"unknown probe {unknown[0]!r}; available: {', '.join(known)}"
                         if unknown else "each probe may be given once")
    for name, cls in known.items():
        given = probe_values(args, cls)
        if given and name not in names:
            option = next(o for o in cls.options() if o.name in given)
            flags = "/".join([f"--{name}-{option.name.replace('_', '-')}", *option.aliases])
            raise UsageError(f"{flags} belongs to the {name} probe; add it to --probes")
    try:
        backend.check({n: known[n].sites for n in names}, {n: c.sites for n, c in known.items()})
    except UnsupportedSite as err:
        raise UsageError(str(err)) from err
    check_target(Path(args.out), overwrite=args.overwrite)
    where = placement(args)  # --device or --device-map, checked before any model loads
    check_engine(args)
    dtype = getattr(torch, args.dtype)

    def load(name: str):
        return tokenprobe.load(name, dtype=dtype, **where)

    values = {n: probe_values(args, known[n]) for n in names}
    if args.impl is not None:
        apply_impl(args.impl, {n: known[n] for n in names}, values)
    if args.no_selfcheck:
        from tokenprobe.kernels.selfcheck import set_enabled

        set_enabled(False)
    one_line_selfcheck_warnings()
    if args.engine == "ray":  # the models load in the Ray workers, never in this process
        return report_run(args, run_on_ray(args, prompts, values, dtype))
    try:  # settings are checked (and a compare model loaded) before the probed model loads
        probes = [known[n].from_options(values[n], second_model(args.model, load))
                  for n in names]
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        loaded = load(args.model)
    except PlacementError as err:  # module names are checked once the config is read
        raise UsageError(str(err)) from err
    try:
        result = tokenprobe.run(backend.over(loaded), prompts, probes, tokenizer=loaded.tokenizer,
                                batch_size=args.batch_size, window=args.window,
                                truncate=args.truncate,
                                max_tokens=args.max_tokens, out=args.out,
                                overwrite=args.overwrite, progress=not args.quiet, seed=args.seed)
    except CorpusError as err:
        raise UsageError(str(err)) from err
    except ValueError as err:  # e.g. a compare model over another vocabulary
        raise UsageError(str(err)) from err
    return report_run(args, result)


def report_run(args: argparse.Namespace, result) -> int:
    """Print a finished run's summary and warnings; the exit code (--strict)."""
    from tokenprobe.cli.summary import print_summary

    print_summary(result)
    print(f"\nrun saved to {args.out}  (tables: {', '.join(result.meta['tables'])})")
    for warning in result.meta.get("warnings", []):
        print(f"tokenprobe: warning: {warning}", file=sys.stderr)
    for probe, found in result.meta.get("diagnostics", {}).items():
        for sentence in found:
            print(f"tokenprobe: note: {probe}: {sentence}", file=sys.stderr)
    return EXIT_NONFINITE if args.strict and result.meta.get("warnings") else EXIT_OK


def check_engine(args: argparse.Namespace) -> None:
    """UsageError (before anything loads) for the Ray options without --engine ray, or
    --engine ray without Ray installed."""
    given = [flag for flag, value in (("--workers", args.workers),
                                      ("--gpus-per-worker", args.gpus_per_worker),
                                      ("--ray-address", args.ray_address)) if value is not None]
    if args.engine != "ray":
        if given:
            raise UsageError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to "
                             "the Ray engine; add --engine ray")
        return
    from tokenprobe.engine_ray import RayMissingError, require_ray

    try:
        require_ray()
    except RayMissingError as err:
        raise UsageError(f"--engine ray: {err}") from err


def run_on_ray(args: argparse.Namespace, prompts, values: dict[str, dict], dtype):
    """The run over a pool of Ray actors (`run_ray`), with this command's model, probe options,
    load options and run options."""
    from tokenprobe.cli.args import placement
    from tokenprobe.engine_ray import run_ray

    gpus = args.gpus_per_worker or 0
    load_options = {"dtype": dtype, **placement(args)}
    if gpus > 0 and load_options.get("device") == "cpu":
        load_options.pop("device")  # each actor on the GPU Ray gives it
    try:
        return run_ray(args.model, prompts, values, load_options=load_options,
                       backend=args.backend, workers=args.workers or 2, gpus_per_worker=gpus,
                       address=args.ray_address, batch_size=args.batch_size,
                       window=args.window, truncate=args.truncate, max_tokens=args.max_tokens,
                       out=args.out, overwrite=args.overwrite, progress=not args.quiet,
                       seed=args.seed)
    except ValueError as err:  # a bad probe option, the corpus, a compare model's vocabulary
        raise UsageError(str(err)) from err


def second_model(probed: str, load):
    """The loader of a model a probe option names (--compare): refuses one whose vocabulary
    size differs from the probed model's before either loads (ValueError), when both sizes
    can be read without loading (`tokenprobe.models.vocab_size`)."""
    from tokenprobe.models import vocab_size

    def load_second(name: str):
        mine, theirs = vocab_size(probed), vocab_size(name)
        if mine and theirs and mine != theirs:
            raise ValueError(f"--compare {name} has a vocabulary of {theirs} tokens and "
                             f"{probed} one of {mine}: the two-model columns compare the same "
                             "vocabulary (checked before either model loads); compare models "
                             f"with different tokenisers span by span: tokenprobe spans "
                             f"--model {probed} --vs {name} --prompt TEXT --out DIR")
        return load(name)

    return load_second


def one_line_selfcheck_warnings() -> None:
    """Print a failed kernel self-check as the CLI's other warnings: one line on stderr."""
    import warnings

    from tokenprobe.kernels.selfcheck import SelfCheckWarning

    default = warnings.formatwarning
    if getattr(default, "tokenprobe", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, SelfCheckWarning):
            return f"tokenprobe: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.tokenprobe = True
    warnings.formatwarning = formatwarning


def apply_impl(impl: str, chosen: dict, values: dict[str, dict]) -> None:
    """--impl: `impl` for every chosen probe with an impl option not given as --PROBE-impl."""
    options = impl_options(chosen)
    if not options:
        raise UsageError("--impl sets the probes' kernel implementation, and none of "
                         f"{', '.join(chosen)} has one")
    for name, option in options.items():
        if "impl" in values[name]:
            continue
        if option.choices and impl not in option.choices:
            raise UsageError(f"--impl {impl} is not an implementation of the {name} probe "
                             f"(one of {', '.join(option.choices)}); give --{name}-impl too")
        values[name]["impl"] = impl
