"""The entropy probe's reductions over per-token values, pure and independent of the model:
ARES window entropy (shawn0728/ARES), entropy bands and forking tokens (Wang et al., "Beyond the
80/20 Rule", rho = 0.2) and TIP's quadrants (Xu et al., "Token Importance in On-Policy
Distillation"), and the run-level figures over a whole run by SQL (`run_quantiles`,
`run_summary`, `run_diagnostics`, over a `tokenprobe.store.PartsSQL`). Definitions and
defaults: README, "Measures". Registers no probe.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

TIP_QUADRANTS = ("high_H_high_D", "high_H_low_D", "low_H_high_D", "low_H_low_D")
MIN_SCORED = 100  # scored tokens below which quantile bands are flagged (diagnostics)


def window_entropy(entropy: np.ndarray, w: int = 4, *, start: str = "next",
                   partial: bool = False) -> np.ndarray:
    """ARES window entropy of one prompt: H_bar_t = mean(H_{t+1..t+w}) ("next", their code) or
    mean(H_{t..t+w-1}) ("current", the paper). Position 0 (no prediction) is skipped. A window
    cut by the end of the prompt is NaN, as their code counts only complete windows
    (`partial=True` averages what is left); a window that holds a NaN or inf entropy is NaN."""
    h = np.asarray(entropy, dtype=float)
    n = len(h)
    shift = 1 if start == "next" else 0
    out = np.full(n, np.nan)
    for t in range(n):
        lo = max(t + shift, 1)
        chunk = h[lo:t + shift + w]
        complete = t + shift + w <= n and len(chunk) == t + shift + w - lo
        if len(chunk) and (complete or partial) and np.isfinite(chunk).all():
            out[t] = chunk.mean()
    return out


def topk_entropy(probs: np.ndarray, *, tail: bool = False) -> np.ndarray:
    """The entropy ARES's code sees: -sum p log p over the top-k probabilities (vLLM's top-10
    logprobs), with `tail` adding -r log r for the remaining mass r (their trigger function).
    (N, k) -> (N,), nats."""
    p = np.asarray(probs, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        if tail:
            rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
            out += -np.where(rest > 0, rest * np.log(rest), 0.0)
    return out


def forking_count(n: int, rho: float) -> int:
    """How many of `n` scored tokens are forking: the 80/20 code's k = max(1, int(n * rho +
    0.9999)) (its ceil), 0 when there are none."""
    return max(1, int(n * rho + 0.9999)) if n else 0


def scored_tokens(tokens: pd.DataFrame, score: str = "response", *, finite: bool = True
                  ) -> pd.Series:
    """Which rows of a `tokens` frame are scored (quantiles, bands, forking, summaries): pos > 0,
    a finite entropy (`finite`), and with `score="response"` the response tokens of prompts
    that have a response (column `in_response`; every token of a prompt without one)."""
    mask = tokens.pos > 0
    if finite:
        mask &= np.isfinite(tokens.entropy.to_numpy(float))
    if score == "response" and "in_response" in tokens:
        mask &= tokens.in_response.fillna(True).astype(bool)
    return mask


def scored_sql(columns: list[str], score: str = "response", *, finite: bool = True) -> str:
    """`scored_tokens` as a SQL condition on table `tokens` with `columns`."""
    where = "pos > 0" + (" AND coalesce(isfinite(entropy), false)" if finite else "")
    if score == "response" and "in_response" in columns:
        where += " AND coalesce(in_response, true)"
    return where


def entropy_bands(entropy: pd.Series, scored: pd.Series | None = None, *,
                  low_quantile: float = 0.5, high_quantile: float = 0.8, rho: float = 0.2
                  ) -> tuple[pd.Series, pd.Series, dict[str, float]]:
    """Band (low < q_low <= mid < q_high <= high) and forking flag of each scored token, and
    the thresholds used. The band quantiles are numpy's (linear) over the scored entropies;
    forking tokens are exactly `forking_count` of them, the highest entropies (`top_k_forking`).
    `scored` (default: the finite entropies) chooses the tokens; the others get NA."""
    scored = pd.Series(np.isfinite(entropy.to_numpy(float)), index=entropy.index) \
        if scored is None else scored
    values = entropy[scored]
    if values.empty:
        q = {"q_low": math.nan, "q_high": math.nan}
    else:
        q = {"q_low": float(np.quantile(values, low_quantile)),
             "q_high": float(np.quantile(values, high_quantile))}
    forking = top_k_forking(entropy, scored, rho)
    picked = entropy[forking.fillna(False).astype(bool)]
    q.update(forking_k=int(len(picked)),
             forking_threshold=float(picked.min()) if len(picked) else math.nan)
    return bands_at(entropy, q, scored), forking, q


def top_k_forking(entropy: pd.Series, scored: pd.Series, rho: float) -> pd.Series:
    """The forking flag of the 80/20 code (get_global_entropy_top_mask): exactly
    `forking_count(n)` of the n scored tokens, by entropy, pooled over all of them; where the
    k-th value is tied, the earliest tokens (in row order) are taken, so ties never add tokens
    (torch.topk picks among ties in no stated order). NA where not scored."""
    out = pd.Series(pd.NA, index=entropy.index, dtype="boolean")
    values = entropy[scored].to_numpy(float)
    k = forking_count(len(values), rho)
    flags = np.zeros(len(values), dtype=bool)
    flags[np.argsort(-values, kind="stable")[:k]] = True
    out[scored[scored].index] = flags
    return out


def bands_at(entropy: pd.Series, q: dict[str, float], scored: pd.Series | None = None
             ) -> pd.Series:
    """Band of each token at given thresholds (q_low, q_high, as `entropy_bands` returns
    them); NA where the entropy is NaN or inf or the token is not `scored`."""
    keep = np.isfinite(entropy.to_numpy(float))
    if scored is not None:
        keep &= scored.to_numpy(bool)
    band = pd.Series(np.where(entropy >= q["q_high"], "high",
                              np.where(entropy >= q["q_low"], "mid", "low")),
                     index=entropy.index, dtype="string")
    band[~keep] = pd.NA
    return band


def forking_at(tokens: pd.DataFrame, scored: pd.Series, q: dict) -> pd.Series:
    """The run-level forking flag of the rows of one part: entropy above the run's k-th
    largest (`forking_threshold`), or equal to it up to the last tie taken (`forking_cut`,
    [prompt_id, pos]; `run_quantiles`). NA where not scored."""
    out = pd.Series(pd.NA, index=tokens.index, dtype="boolean")
    if not q.get("forking_k"):
        out[scored] = False
        return out
    h, v = tokens.entropy.to_numpy(float), q["forking_threshold"]
    cut_prompt, cut_pos = q["forking_cut"]
    order = (tokens.prompt_id.to_numpy() < cut_prompt) | (
        (tokens.prompt_id.to_numpy() == cut_prompt) & (tokens.pos.to_numpy() <= cut_pos))
    flags = (h > v) | ((h == v) & order)
    out[scored] = flags[scored.to_numpy(bool)]
    return out


def tip_thresholds(sql, where: str, q: float) -> dict[str, float]:
    """TIP's default thresholds (tokenprobe's choice): the `q` quantiles of entropy and of JSD
    over the rows of `tokens` where SQL `where` holds (scored tokens with a finite JSD)."""
    row = sql.sql(f"SELECT quantile_cont(entropy, {q!r}) AS h, quantile_cont(jsd, {q!r}) AS d "
                  f"FROM tokens WHERE {where} AND coalesce(isfinite(jsd), false)").iloc[0]
    return {"tip_entropy_at": float(row.h) if row.h is not None else math.nan,
            "tip_jsd_at": float(row.d) if row.d is not None else math.nan}


def run_quantiles(sql, where: str, config) -> dict[str, float]:
    """`entropy_bands`' thresholds over the rows of table `tokens` where SQL `where` holds,
    by DuckDB over the whole run (`sql`: a `tokenprobe.store.PartsSQL`) without loading it:
    exact band quantiles (linear, as numpy's default; NaN when no row is left) and the forking
    selection: k, the k-th largest entropy and the last tied token taken (in prompt, position
    order), so that `forking_at` flags exactly k tokens part by part."""
    levels = [float(config.low_quantile), float(config.high_quantile)]
    row = sql.sql(f"SELECT quantile_cont(entropy, [{', '.join(map(repr, levels))}]) AS q, "
                  f"count(*) AS n FROM tokens WHERE {where}").iloc[0]
    values = [float(v) for v in row.q] if row.n else [math.nan] * 2
    out = dict(zip(("q_low", "q_high"), values))
    k = forking_count(int(row.n), float(config.rho))
    out.update(forking_k=k, forking_threshold=math.nan, forking_cut=None)
    if k:
        v = float(sql.sql(f"SELECT entropy FROM tokens WHERE {where} ORDER BY entropy DESC "
                          f"LIMIT 1 OFFSET {k - 1}").entropy.iloc[0])
        above = int(sql.sql(f"SELECT count(*) AS n FROM tokens WHERE {where} AND entropy > ?",
                            [v]).n.iloc[0])
        cut = sql.sql(f"SELECT prompt_id, pos FROM tokens WHERE {where} AND entropy = ? "
                      f"ORDER BY prompt_id, pos LIMIT 1 OFFSET {k - above - 1}", [v]).iloc[0]
        out.update(forking_threshold=v, forking_cut=[int(cut.prompt_id), int(cut.pos)])
    return out


def tip_quadrant(entropy: np.ndarray, jsd: np.ndarray, vocab: int, *, entropy_threshold: float = 0.5,
                 divergence_threshold: float = 0.5) -> np.ndarray:
    """TIP quadrant per token from student entropy and JSD(student || teacher), both in nats,
    at fixed thresholds on H / ln V and JSD / ln 2 (tokenprobe's option; TIP's code has none)."""
    return tip_quadrant_at(entropy, jsd, entropy_threshold * math.log(vocab),
                           divergence_threshold * math.log(2))


def tip_weight(entropy: np.ndarray, jsd: np.ndarray, vocab: int, *, alpha: float = 1.0,
               gamma: float = 1.0) -> np.ndarray:
    """The token weight TIP's code samples distillation tokens by: (H / ln V)^alpha x
    (JSD / ln 2)^gamma (HJSang/OPSD_OnPolicyDistillation, losses.py)."""
    return (np.asarray(entropy) / math.log(vocab)) ** alpha * \
        (np.asarray(jsd) / math.log(2)) ** gamma


def tip_quadrant_at(entropy: np.ndarray, jsd: np.ndarray, h_at: float, d_at: float) -> np.ndarray:
    """TIP quadrant per token: high H at entropy >= `h_at`, high D at jsd >= `d_at` (nats);
    None where either is NaN."""
    entropy, jsd = np.asarray(entropy, dtype=float), np.asarray(jsd, dtype=float)
    high_h, high_d = entropy >= h_at, jsd >= d_at
    labels = np.where(high_h, np.where(high_d, TIP_QUADRANTS[0], TIP_QUADRANTS[1]),
                      np.where(high_d, TIP_QUADRANTS[2], TIP_QUADRANTS[3])).astype(object)
    labels[np.isnan(entropy) | np.isnan(jsd)] = None
    return labels


def strict_mean(x: pd.Series) -> float:
    """The mean, NaN when any value is NaN or inf (never a mean over a part of the prompt)."""
    values = x.to_numpy(float)
    return float(values.mean()) if np.isfinite(values).all() else math.nan


def run_summary(sql, config, stats: dict) -> dict:
    """Run-level figures over the scored tokens (`scored_sql`): their count, mean entropy and
    self-certainty, perplexity, two-model means when present, and the band and forking
    thresholds used (`stats`, from `run_quantiles`; absent with per-prompt quantiles).
    Prompts with a NaN or inf statistic are left out and counted in `prompts_excluded`."""
    finite = " AND ".join(f"coalesce(isfinite({c}), false)"
                          for c in ("entropy", "logprob", "self_certainty"))
    scored = scored_sql(sql.columns("tokens"), config.score, finite=False)
    kept = (f"{scored} AND prompt_id NOT IN (SELECT prompt_id FROM tokens WHERE {scored} "
            f"AND NOT ({finite}))")
    extra = [c for c in ("jsd", "kl_student_teacher", "critical_ce")
             if c in sql.columns("tokens")]
    row = sql.sql(
        f"SELECT (SELECT count(DISTINCT prompt_id) FROM tokens WHERE {scored} AND NOT "
        f"({finite})) AS excluded, count(*) AS n, avg(entropy) AS h, "
        f"avg(self_certainty) AS c, avg(logprob) AS lp"
        + "".join(f", avg({c}) AS {c}" for c in extra)
        + f" FROM tokens WHERE {kept}").iloc[0]
    excluded = {"prompts_excluded": int(row.excluded)}
    if not row.n:
        return {"n_scored": 0, **excluded, "score": config.score}
    out = {"n_scored": int(row.n), **excluded, "score": config.score,
           "mean_entropy": float(row.h), "mean_self_certainty": float(row.c),
           "perplexity": math.exp(-float(row.lp)),
           **{k: v for k, v in stats.items() if k != "forking_cut"},
           "quantiles_over": config.quantiles_over}
    for col in extra:
        out[f"mean_{col}"] = float(row[col])
    return out


def run_diagnostics(sql, cfg) -> list[str]:
    """When bands and forking flags rest on too few tokens to place a quantile: under
    MIN_SCORED scored tokens in the run (quantiles over the run) or in a prompt (over each
    prompt); `cfg` is the probe's EntropyConfig."""
    counts = sql.sql(f"SELECT prompt_id, count(*) AS n FROM tokens WHERE "
                     f"{scored_sql(sql.columns('tokens'), cfg.score)} GROUP BY prompt_id")
    if cfg.quantiles_over == "run" and counts.n.sum() < MIN_SCORED:
        return [f"entropy bands and forking flags rest on {int(counts.n.sum())} scored "
                f"tokens in the whole run: too few for its {cfg.low_quantile:g} and "
                f"{cfg.high_quantile:g} quantiles and its top {cfg.rho:.0%} by entropy to "
                f"mean much (give at least {MIN_SCORED})"]
    few = int((counts.n < MIN_SCORED).sum())
    if cfg.quantiles_over == "prompt" and few:
        return [f"{few} of {len(counts)} prompts have under {MIN_SCORED} scored tokens: "
                "their own quantiles (--quantiles prompt) place bands and forking flags on "
                "a handful of values; quantiles over the run are steadier"]
    return []
