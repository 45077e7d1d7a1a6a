"""Prompt compression by attribution, in the spirit of FrugalPrompt ("FrugalPrompt: Reducing
Contextual Overhead in Large Language Models via Token Attribution", 2025): rank a prompt's units
by an attribution, keep the top k% in their original order, re-score the target.

The curve of the target's value against the fraction kept, for the top-k units, the bottom-k
and random k-subsets, says how much of the decision the attribution's ranking concentrates:
a faithful ranking keeps the target near its full value with few units (top) and loses it
fastest when those units go first (bottom), with random subsets in between.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from tokenprobe.analyses.attribution_shapley import UnitGame

ORDERS = ("top", "bottom", "random")
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
COLUMNS = ["order", "keep_fraction", "n_kept", "value", "se", "draws"]


def kept(n: int, fraction: float) -> int:
    """Units kept at `fraction`: ceil(fraction * n), so any fraction above 0 keeps one."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"keep fractions lie in [0, 1], got {fraction}")
    return min(n, math.ceil(fraction * n - 1e-9))


def ranking(scores: np.ndarray) -> np.ndarray:
    """Unit indices from the highest score to the lowest; ties keep text order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def compression_curve(game: UnitGame, scores: Sequence[float], *,
                      fractions: Sequence[float] = FRACTIONS, draws: int = 8,
                      seed: int = 0) -> pd.DataFrame:
    """The target's value with only the top-k, bottom-k or k random units present.

    Args:
        game: the prompt's `UnitGame`; its absent mode applies to the dropped units (FrugalPrompt
            deletes them: "removed").
        scores: (n,) one attribution per unit (higher: more support for the target).
        fractions: fractions of units kept (`kept` rounds up).
        draws: random subsets per fraction (numpy Generator(seed)).

    Returns:
        One row per (order, fraction), columns `COLUMNS`: order (top / bottom / random),
        keep_fraction, n_kept, value (nats; random: the mean over its draws), se (random: the
        std (ddof=1) of its draws / sqrt(draws); 0 for top and bottom, which are one subset)
        and draws. All subsets are scored in one batched call.
    """
    n, scores = game.n, np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"need one score per unit ({n}), got shape {scores.shape}")
    if draws < 2:
        raise ValueError(f"draws must be >= 2 for a standard error, got {draws}")
    order, rng = ranking(scores), np.random.default_rng(seed)
    plan: list[tuple[str, float, int, np.ndarray]] = []  # (order, fraction, k, (m, n) subsets)
    for fraction in fractions:
        k = kept(n, fraction)
        for name in ORDERS:
            chosen = ([order[:k]] if name == "top" else [order[n - k:]] if name == "bottom"
                      else [rng.choice(n, k, replace=False) for _ in range(draws)])
            masks = np.zeros((len(chosen), n), dtype=bool)
            for row, units in enumerate(chosen):
                masks[row, units] = True
            plan.append((name, float(fraction), k, masks))
    values = game.values(np.concatenate([m for *_, m in plan]))
    rows, at = [], 0
    for name, fraction, k, masks in plan:
        v, at = values[at:at + len(masks)], at + len(masks)
        se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
        rows.append((name, fraction, k, float(v.mean()), float(se), len(v)))
    return pd.DataFrame(rows, columns=COLUMNS)
