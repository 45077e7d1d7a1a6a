"""Sink analyses over runs: Gu et al.'s sink rate per prompt, Wong et al.'s sink levels."""
from __future__ import annotations

import pandas as pd

from tokenprobe.probes.sink_measures import run_sink_rate, sink_rates
from tokenprobe.store import Run


def sink_rate(run: Run, *, eps: float | None = None, by_prompt: bool = True) -> pd.DataFrame:
    """Sink_k^eps = 100 x share of (prompt, layer, head) with alpha_k > eps (Gu et al. 2024).

    Args:
        run: a run with the sinks probe.
        eps: threshold; default the one the probe ran with (0.3 unless changed).
        by_prompt: one row per prompt (with its T), else one row for the run.

    A prompt whose sink mass is NaN or inf at any (layer, head) (the model's numbers
    overflowed: see the run's `nonfinite` table) has no sink rate (NaN, with its count in
    `nonfinite_heads`) and is left out of the run's rate, counted in `prompts_excluded`.

    Returns:
        columns prompt_id (if by_prompt), T (tokens; T_min/T_max for the run), sink_rate, eps,
        k_pos, and nonfinite_heads (by prompt) or prompts_excluded (for the run).
    """
    config = next(p for p in run.meta["probes"] if p["name"] == "sinks")
    eps = config["eps"] if eps is None else eps
    per_prompt = sink_rates(run.heads, eps)
    lengths = run.prompts.set_index("prompt_id").n_tokens
    if by_prompt:
        out = per_prompt.reset_index()[["prompt_id", "sink_rate", "nonfinite_heads"]]
        out.insert(1, "T", out.prompt_id.map(lengths))
    else:
        out = pd.DataFrame({"T_min": [lengths.min()], "T_max": [lengths.max()],
                            "sink_rate": [run_sink_rate(per_prompt)],
                            "prompts_excluded": [int((per_prompt.nonfinite_heads > 0).sum())]})
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
