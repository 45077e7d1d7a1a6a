"""Per-prompt summary of massive activations: where they first appear, in which dims and tokens."""
from __future__ import annotations

import pandas as pd

from tokenprobe.store import Run


def massive_summary(run: Run) -> pd.DataFrame:
    """One row per prompt: tokens, first block with a massive activation and what it holds.

    Columns: prompt_id, n_tokens, first_massive_layer (NA if none), last_massive_layer,
    massive_dims (sorted distinct dims over all layers), massive_positions (sorted distinct
    positions; both abbreviated past 8 values),
    max_massive (largest |value|).
    """
    prompts = run.prompts[["prompt_id", "n_tokens"]]
    m = run.massive
    if m.empty:
        out = prompts.assign(first_massive_layer=pd.NA, last_massive_layer=pd.NA,
                             massive_dims="", massive_positions="", max_massive=float("nan"))
        return out.astype({"first_massive_layer": "Int64", "last_massive_layer": "Int64"})
    per = m.assign(abs_value=m.value.abs()).groupby("prompt_id").agg(
        first_massive_layer=("layer", "min"), last_massive_layer=("layer", "max"),
        massive_dims=("dim", _joined), massive_positions=("pos", _joined),
        max_massive=("abs_value", "max"))
    out = prompts.merge(per, on="prompt_id", how="left")
    return out.astype({"first_massive_layer": "Int64", "last_massive_layer": "Int64"}).fillna(
        {"massive_dims": "", "massive_positions": ""})


def _joined(values: pd.Series, limit: int = 8) -> str:
    """Sorted distinct values, comma-joined; past `limit`, the first ones and a count."""
    distinct = sorted(set(values))
    shown = ",".join(str(v) for v in distinct[:limit])
    return shown if len(distinct) <= limit else f"{shown},... ({len(distinct)} in all)"
