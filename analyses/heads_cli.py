"""The `tokenprobe heads` subcommand: active vs dormant heads (analyses/heads.py) from the CLI."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from tokenprobe.analyses.heads import (BUILTIN_DOMAINS, METHODS, HeadAblationConfig,
                                       head_effects, load_domains, read_domain)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `heads` subcommand to `subparsers`; its handler is `cmd_heads`."""
    from tokenprobe.cli.args import add_model_argument, device, finite_float, positive_int

    p = subparsers.add_parser(
        "heads", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="active vs dormant heads: loss change when each head is ablated, per domain",
        description="Ablate every attention head, one at a time, and measure the change in\n"
                    "mean next-token loss on each prompt domain (Guo et al., Active-Dormant\n"
                    "Attention Heads). A head is active on a domain when the loss rises by at\n"
                    "least --threshold nats, dormant otherwise. It costs one forward pass per\n"
                    "head and domain batch (smollm2-135m on 2 CPU cores: 15-45 s per head for\n"
                    "the two built-in domains, 270 heads): restrict --layers on a CPU.",
        epilog="examples:\n  tokenprobe heads --method sink --layers 0-3 --out heads.parquet\n"
               "  tokenprobe heads --domains prose,my_prompts.txt --threshold 0.02\n\n"
               "domain files: one prompt per line; the two characters \\n in a line are read "
               "as a newline.")
    add_model_argument(p)
    p.add_argument("--method", choices=METHODS, default=HeadAblationConfig.method,
                   help="zero: zero the head's output; sink: move all its attention to the "
                        "first token (default: zero)")
    p.add_argument("--threshold", type=finite_float, default=HeadAblationConfig.threshold,
                   help="loss rise in nats from which a head counts as active "
                        f"(default {HeadAblationConfig.threshold}; the paper gives none)")
    p.add_argument("--domains", default=",".join(BUILTIN_DOMAINS),
                   help="comma-separated built-in domain names (prose, code) and/or .txt files "
                        "named by their stem (default: prose,code)")
    p.add_argument("--layers", help="layers to ablate, 0-based, e.g. 0,3,10-12 (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=HeadAblationConfig.batch_size,
                   help=f"prompts per forward (default {HeadAblationConfig.batch_size})")
    p.add_argument("--device", default="cpu", type=device,
                   help="torch device: cpu (default), cuda, cuda:N or mps; checked before the "
                        "model loads")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE (.parquet or .csv); "
                                                 "written to a temporary name, then renamed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_heads)
    return p


def parse_layers(spec: str, n_layers: int | None) -> list[int]:
    """'0,3,10-12' -> [0, 3, 10, 11, 12], each checked against `n_layers` (None: the syntax
    only, before a model is loaded)."""
    out: set[int] = set()
    for part in (s.strip() for s in spec.split(",")):
        try:
            lo, hi = part.split("-", 1) if "-" in part else (part, part)
            first, last = int(lo), int(hi)
        except ValueError as err:
            raise ValueError(f"bad --layers item {part!r}: use numbers and ranges like 0,3,10-12"
                             ) from err
        if not 0 <= first <= last:
            raise ValueError(f"bad --layers item {part!r}: a range runs from low to high, e.g. "
                             "10-12")
        if n_layers is not None and last >= n_layers:
            raise ValueError(f"--layers item {part!r} is outside 0..{n_layers - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


def _domains_from_spec(spec: str) -> dict[str, list[str]]:
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in BUILTIN_DOMAINS:
            out.update(load_domains([item]))
        elif item.endswith(".txt"):
            try:
                prompts = read_domain(item)
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"cannot read domain file {item}: {err}") from err
            if not prompts:
                raise ValueError(f"domain file {item} holds no prompts")
            out[Path(item).stem] = prompts
        else:
            raise ValueError(f"unknown domain {item!r}: give a built-in ({', '.join(BUILTIN_DOMAINS)})"
                             " or a .txt file")
    if not out:
        raise ValueError("--domains names no domain")
    return out


def write_table(frame: pd.DataFrame, out: str | os.PathLike) -> None:
    """Write `frame` to `out` (.parquet or .csv) through a temporary file renamed into place."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if out.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_summary(frame: pd.DataFrame, *, top: int = 5) -> None:
    """Per domain: active/dormant counts, base loss and the `top` heads by delta_loss."""
    threshold = frame.attrs.get("threshold")
    for domain, rows in frame.groupby("domain", sort=False):
        active = int(rows.label.eq("active").sum())
        print(f"{domain}: {active} active / {len(rows) - active} dormant heads "
              f"(method {rows.method.iat[0]}, threshold {threshold} nats, "
              f"base loss {rows.base_loss.iat[0]:.4f})")
        for r in rows.nlargest(top, "delta_loss").itertuples():
            print(f"  layer {r.layer:3d} head {r.head:3d}  delta {r.delta_loss:+.4f}  {r.label}")


def cmd_heads(args: argparse.Namespace) -> int:
    """Handler of `tokenprobe heads`; returns the exit code."""
    import tokenprobe
    from tokenprobe.cli.args import EXIT_OK, UsageError
    from tokenprobe.store import check_writable

    if args.out and Path(args.out).suffix not in (".parquet", ".csv"):
        raise UsageError(f"--out must end in .parquet or .csv, got {args.out}")
    if args.out:
        check_writable(Path(args.out))
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"the directory of --out {args.out} does not exist")
    try:
        config = HeadAblationConfig(method=args.method, threshold=args.threshold,
                                    batch_size=args.batch_size)
        domains = _domains_from_spec(args.domains)
        if args.layers:  # the syntax now, the range once the model is loaded
            parse_layers(args.layers, None)
    except ValueError as err:
        raise UsageError(str(err)) from err
    loaded = tokenprobe.load(args.model, device=args.device)
    layers = None
    if args.layers:
        try:
            layers = parse_layers(args.layers, loaded.model.config.num_hidden_layers)
        except ValueError as err:
            raise UsageError(str(err)) from err
    start = time.perf_counter()
    frame = head_effects(loaded, domains, config, layers=layers, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    n_heads = len(frame) // len(domains)
    print(f"model {loaded.name}: {n_heads} heads x {len(domains)} domain(s) in {elapsed:.1f} s")
    print_summary(frame)
    if args.out:
        write_table(frame, args.out)
        print(f"table saved to {args.out}")
    return EXIT_OK
