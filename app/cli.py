"""`tokenprobe app [RUNS_ROOT]`: serve the Streamlit dashboard over a runs root."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenprobe.app.runs import ROOT_ENV

DASHBOARD = Path(__file__).with_name("dashboard.py")


def streamlit_command(root: Path, *, address: str, port: int) -> list[str]:
    """The `streamlit run` command line for the dashboard (headless: prints the URL, asks
    nothing, sends no usage statistics)."""
    return [sys.executable, "-m", "streamlit", "run", str(DASHBOARD),
            "--server.address", address, "--server.port", str(port),
            "--server.headless", "true", "--server.fileWatcherType", "none",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]


def cmd_app(args: argparse.Namespace) -> int:
    from tokenprobe.cli.args import UsageError

    root = Path(args.root).resolve()
    if not root.is_dir():
        raise UsageError(f"runs root {args.root} is not a directory; make a run first "
                         f"(`make demo` writes runs/demo) or create it with mkdir")
    command = streamlit_command(root, address=args.address, port=args.port)
    print(f"tokenprobe app: serving the runs under {root} at http://{args.address}:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    os.execve(sys.executable, command, {**os.environ, ROOT_ENV: str(root)})
    return 0  # not reached: the process is now streamlit


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `app` subcommand."""
    from tokenprobe.cli.args import port

    parser = subparsers.add_parser(
        "app", help="the Streamlit dashboard over a directory of runs",
        description="Serve the tokenprobe dashboard (streamlit run underneath): pick a run "
                    "under RUNS_ROOT or make one live, see its tokens coloured by a measure, "
                    "layer x head and layer x position heatmaps, massive activations, sinks, "
                    "critical tokens, and compare two runs. Only runs inside RUNS_ROOT are "
                    "opened.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("root", nargs="?", default="runs", metavar="RUNS_ROOT",
                        help="directory holding run directories; live runs are saved here")
    parser.add_argument("--port", type=port, default=8501, help="port to listen on (1-65535)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to bind (default loopback only; 0.0.0.0 exposes it)")
    parser.set_defaults(func=cmd_app)
    return parser
