"""Views of a two-model run (`--probe entropy --compare MODEL`): which model it was compared
with, per-prompt means of the two-model columns and TIP's plane (entropy against divergence).
Frames only, as in `views`; the figure is `figures.tip_figure`."""
from __future__ import annotations

import math

import pandas as pd

from tokenprobe.analyses.views import CATEGORY_ORDER, require
from tokenprobe.store import Run

TWO_MODEL_COLUMNS = ("jsd", "kl_student_teacher", "kl_teacher_student", "teacher_entropy",
                     "critical_ce")


def compare_model(run: Run) -> str | None:
    """The second model of a two-model run, else None."""
    for probe in run.meta.get("probes", []):
        found = probe.get("compare") if isinstance(probe, dict) else None
        if isinstance(found, dict) and found.get("model"):
            return str(found["model"])
    return None


def two_model_tokens(run: Run) -> pd.DataFrame:
    """The run's tokens with a JSD (pos > 0): the tokens of TIP's plane and of the summary."""
    tokens = require(run, "tokens", "jsd", "entropy --compare MODEL", "tokens.jsd")
    return tokens[(tokens.pos > 0) & tokens.jsd.notna()]


def tip_points(run: Run) -> pd.DataFrame:
    """TIP's plane for a two-model run: per scored token H / ln V against JSD / ln 2 with its
    quadrant (columns prompt_id, pos, token, norm_entropy, norm_jsd, tip_quadrant)."""
    rows = two_model_tokens(run)
    vocab = int(run.meta.get("vocab_size") or 0) or int(run.tables["tokens"].token_id.max()) + 1
    return pd.DataFrame({"prompt_id": rows.prompt_id, "pos": rows.pos, "token": rows.token,
                         "norm_entropy": rows.entropy / math.log(vocab),
                         "norm_jsd": rows.jsd / math.log(2),
                         "tip_quadrant": rows.get("tip_quadrant")}).reset_index(drop=True)


def two_model_summary(run: Run) -> pd.DataFrame:
    """Per prompt: its tokens with a JSD, the mean of each two-model column the run has
    (nats) and the share of tokens in each TIP quadrant (%)."""
    rows = two_model_tokens(run)
    groups = rows.groupby("prompt_id")
    out = pd.DataFrame({"tokens": groups.size()})
    for column in TWO_MODEL_COLUMNS:
        if column in rows:
            out[f"mean_{column}"] = groups[column].mean()
    if "tip_quadrant" in rows:
        shares = pd.crosstab(rows.prompt_id, rows.tip_quadrant, normalize="index") * 100
        for quadrant in CATEGORY_ORDER["tip_quadrant"]:
            out[f"{quadrant}_pct"] = shares.get(quadrant, 0.0)
    return out.reset_index()
