"""Sink analyses over runs: Gu et al.'s sink rate per prompt, Wong et al.'s sink levels."""
from __future__ import annotations

import pandas as pd

from tokenprobe.store import Run


def sink_rate(run: Run, *, eps: float | None = None, by_prompt: bool = True) -> pd.DataFrame:
    """Sink_k^eps = 100 x share of (prompt, layer, head) with alpha_k > eps (Gu et al. 2024).

    Args:
        run: a run with the sinks probe.
        eps: threshold; default the one the probe ran with (0.3 unless changed).
        by_prompt: one row per prompt (with its T), else one row for the run.

    Returns:
        columns prompt_id (if by_prompt), T (tokens; T_min/T_max for the run), sink_rate, eps, k_pos.
    """
    config = next(p for p in run.meta["probes"] if p["name"] == "sinks")
    eps = config["eps"] if eps is None else eps
    heads = run.heads.assign(is_sink=run.heads.sink_mass > eps)
    lengths = run.prompts.set_index("prompt_id").n_tokens
    if by_prompt:
        out = (100 * heads.groupby("prompt_id").is_sink.mean()).rename("sink_rate").reset_index()
        out.insert(1, "T", out.prompt_id.map(lengths))
    else:
        out = pd.DataFrame({"T_min": [lengths.min()], "T_max": [lengths.max()],
                            "sink_rate": [100 * heads.is_sink.mean()]})
    return out.assign(eps=eps, k_pos=config["k_pos"])


def sink_levels(runs: list[Run], *, kind: str = "secondary") -> pd.DataFrame:
    """Wong et al.'s sink levels: sinks of `kind` over many prompts grouped by their
    (creation_layer, lifetime), most frequent first.

    Each distinct (creation_layer, lifetime) pair is one level; `n` counts sinks, `prompts` the
    prompts holding one, and `tokens` the most common token texts at that level.
    """
    frames = [r.sinks.assign(run=i) for i, r in enumerate(runs) if "sinks" in r.tables]
    if not frames:
        raise ValueError("no run has a sinks table; run the sinks probe first")
    sinks = pd.concat(frames, ignore_index=True)
    sinks = sinks[sinks.kind == kind].assign(
        prompt_key=lambda f: f.run.astype(str) + ":" + f.prompt_id.astype(str))
    levels = sinks.groupby(["creation_layer", "lifetime"]).agg(
        n=("pos", "size"), prompts=("prompt_key", "nunique"),
        tokens=("token", lambda s: ", ".join(repr(t) for t in s.value_counts().index[:5])))
    return levels.reset_index().sort_values(["n", "creation_layer"], ascending=[False, True],
                                            ignore_index=True)
