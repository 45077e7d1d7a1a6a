"""Attention sinks: sink mass, attention entropy, value drains, attention received, secondary sinks.

Sources (definitions and defaults: README, "Measures"):
- Gu et al. 2024, "When Attention Sink Emerges in Language Models" (sail-sg/Attention-Sink,
  `compute_attention_sink`): alpha_k = (1/(T-k)) sum_{i>=k} A[i, k]; Sink_k^eps = 100 x share of
  (prompt, layer, head) with alpha_k > eps, eps = 0.3. It depends on T: always report T.
- Guo et al., "Active-Dormant Attention Heads" (GuoTianYu2000/Active-Dormant-Attention):
  value-state drain ||W_O^(h) v_t^(h)||.
- Wong et al., "On the Existence and Behaviour of Secondary Attention Sinks"
  (JeffreyWong20/Secondary-Attention-Sinks, `hidden_state_norm_detection` and
  `sink_labeling_machine`): secondary sinks by cosine to the primary sink's residual. As in
  their code, only layers in the primary's norm-growth range [start, end) are searched, the
  primary's lifetime is end - start, and only tokens after the primary are candidates. Their
  code reads HF's `hidden_states[1:]`, whose last entry is after the final norm; tokenprobe uses
  the residual after each block throughout.

Attention statistics are computed inside the model's attention call (tokenprobe.attention), a
block of queries at a time; residual statistics inside the block hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from tokenprobe.kernels.attention import IMPLS
from tokenprobe.probe import (Batch, LayerBuffers, Probe, nonfinite_frame, nonfinite_row,
                              register)
from tokenprobe.tables import Column, Table


@dataclass(frozen=True)
class SinksConfig:
    """Sinks probe settings.

    Attributes:
        k_pos: key position whose received attention is `sink_mass` (Gu et al.: k = 0).
        eps: sink-rate threshold on alpha_k (Gu et al.: 0.3).
        candidates: positions that may hold the primary sink (Wong et al.: 0 and 1).
        cos_threshold: |cos| to the primary's residual that flags a sink (Wong et al.: 0.9).
        primary_margin: lifetime >= L - primary_margin labels a primary sink (Wong et al.: 15).
        secondary_min: secondary sinks live more than this many layers (Wong et al.: 4).
            With the defaults, models of 20 layers or fewer have no secondary band: lower
            `primary_margin` for them (e.g. round(L / 2)).
        block: queries per block in the attention statistics.
        impl: attention-statistics implementation ("auto", "torch", "flash", "triton",
            "reference"; see kernels/attention.py).
    """

    k_pos: int = 0
    eps: float = 0.3
    candidates: tuple[int, ...] = (0, 1)
    cos_threshold: float = 0.9
    primary_margin: int = 15
    secondary_min: int = 4
    block: int = 256
    impl: str = field(default="auto", metadata={"choices": IMPLS})

    def __post_init__(self) -> None:
        if self.k_pos < 0 or self.block < 1 or self.primary_margin < 0 or self.secondary_min < 0:
            raise ValueError("k_pos, primary_margin and secondary_min must be >= 0 and block "
                             f">= 1, got {self.k_pos}, {self.primary_margin}, "
                             f"{self.secondary_min}, {self.block}")
        if not (math.isfinite(self.eps) and 0 <= self.cos_threshold <= 1):
            raise ValueError(f"eps must be finite and cos_threshold in [0, 1], got {self.eps}, "
                             f"{self.cos_threshold}")


def value_norms(w_o: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Guo et al.'s value-state drain: ||W_O^(h) v_t^(h)|| per head and token.

    Computed as sqrt(v^T (W_O^(h)T W_O^(h)) v): a (Dh, Dh) Gram matrix per head instead of a
    projection to the model width, the same number with D / Dh times fewer multiplications.

    Args:
        w_o: (D, H * Dh) the attention output projection.
        value: (B, KVH, S, Dh) value states.
        heads: number of query heads H (value head of head h is h // (H / KVH)).

    Returns:
        (B, H, S) float32 norms.
    """
    bsz, kvh, s, dh = value.shape
    groups = heads // kvh
    w = w_o.float().view(-1, heads, dh)  # (D, H, Dh)
    gram = torch.einsum("dhi,dhj->hij", w, w)  # (H, Dh, Dh)
    v = value.float().repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
    quad = (torch.matmul(v, gram) * v).sum(-1)  # (B, H, S)
    return quad.clamp_min(0).sqrt()


def sink_levels_of(norms: np.ndarray) -> tuple[int, int]:
    """Wong et al.'s layer range of the primary sink from its residual norm per layer.

    Args:
        norms: (L,) ||h_l[primary]||.

    Returns:
        (start, end): start = argmax(d) + 1, end = start + argmin(d[start:]) + 1 with
        d = diff(norms); end = L when nothing is left after start; (0, 1) for a single layer.
    """
    if len(norms) < 2:
        return 0, len(norms)
    d = np.diff(norms)
    start = int(np.argmax(d)) + 1
    rest = d[start:]
    end = start + int(np.argmin(rest)) + 1 if len(rest) else len(norms)
    return start, end


def secondary_sinks(norms: np.ndarray, cos: np.ndarray, candidates: list[int], *,
                    cos_threshold: float = 0.9, primary_margin: int = 15,
                    secondary_min: int = 4) -> pd.DataFrame:
    """Primary and secondary sinks of one prompt (Wong et al.).

    Args:
        norms: (L, C) residual norm of each candidate position at each layer.
        cos: (L, C, T) cosine of every token's residual to each candidate's, per layer.
        candidates: the C candidate positions.

    Returns:
        one row per flagged token: pos, kind (primary / secondary / noise), creation_layer,
        lifetime (flagged layers), max_cos (max |cos| to the primary over the searched layers).
    """
    n_layers = norms.shape[0]
    c = int(np.argmax(norms.mean(axis=0)))
    primary = candidates[c]
    start, end = sink_levels_of(norms[:, c])
    absolute = np.abs(cos[start:end, c, :])  # (layers searched, T)
    flags = absolute > cos_threshold
    rows = [(primary, start, end - start, 1.0)]
    for pos in range(primary + 1, cos.shape[-1]):
        layers = np.nonzero(flags[:, pos])[0]
        if len(layers):
            rows.append((pos, start + int(layers[0]), len(layers), float(absolute[:, pos].max())))
    frame = pd.DataFrame(rows, columns=["pos", "creation_layer", "lifetime", "max_cos"])
    bar = n_layers - primary_margin
    frame.insert(1, "kind", np.where(frame.lifetime >= bar, "primary",
                                     np.where(frame.lifetime > secondary_min, "secondary", "noise")))
    return frame


def sink_rates(heads: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Gu et al.'s Sink_k^eps per prompt from `heads` rows: sink_rate = 100 x the share of
    (layer, head) with sink_mass > eps, NaN when any sink mass of the prompt is NaN or inf
    (a rate over the other heads would not be the measure), and nonfinite_heads, their count.

    Returns:
        one row per prompt_id (index), columns sink_rate, nonfinite_heads, n_heads.
    """
    bad = ~np.isfinite(heads.sink_mass.to_numpy(float))
    out = heads.assign(is_sink=heads.sink_mass > eps, bad=bad).groupby("prompt_id").agg(
        sink_rate=("is_sink", "mean"), nonfinite_heads=("bad", "sum"), n_heads=("bad", "size"))
    out["sink_rate"] = (100 * out.sink_rate).where(out.nonfinite_heads == 0)
    return out


def run_sink_rate(rates: pd.DataFrame) -> float:
    """The run's sink rate from `sink_rates`: over every head of the prompts left in (NaN when
    none is)."""
    kept = rates[rates.nonfinite_heads == 0]
    return float((kept.sink_rate * kept.n_heads).sum() / kept.n_heads.sum()) if len(kept) \
        else float("nan")


# `run_sink_rate(sink_rates(heads, eps))` as SQL over table `heads` (parameter: eps), so that a
# run's rate never loads the table: per prompt the rate 100 x mean(sink_mass > eps), then the
# mean over the heads of the prompts with no NaN or inf sink mass.
RUN_SINK_RATE = """
WITH p AS (
    SELECT prompt_id, count(*) AS n,
           sum(CASE WHEN coalesce(isfinite(sink_mass), false) THEN 0 ELSE 1 END) AS bad,
           100 * avg(CASE WHEN sink_mass > $1 THEN 1.0 ELSE 0.0 END) AS rate
    FROM heads GROUP BY prompt_id)
SELECT sum(rate * n) FILTER (WHERE bad = 0) / sum(n) FILTER (WHERE bad = 0) AS sink_rate,
       count(*) FILTER (WHERE bad > 0) AS excluded, coalesce(sum(bad), 0) AS heads_nonfinite
FROM p"""

C = Column


@register
class SinksProbe(Probe):
    """Hook adapter: attention statistics into `heads` and `token_layers.attn_received`,
    residual cosines into `sinks`."""

    name = "sinks"
    sites = ("attention", "resid_post")
    Config = SinksConfig
    tables = {
        "token_layers": {"attn_received": C("float64", "mean over heads and queries i >= pos "
                                                       "of A[l, h, i, pos]")},
        "heads": Table("prompt x layer x head", ("prompt_id", "layer", "head"), {
            "prompt_id": C("int64", "key"), "layer": C("int64", "key"),
            "head": C("int64", "key: the query head"),
            "sink_mass": C("float64", "Gu et al. alpha_k = (1/(T-k)) sum_{i>=k} A[i, k], "
                                      "k = k_pos"),
            "attn_entropy": C("float64", "mean over queries of -sum_j A[i, j] log A[i, j] "
                                         "(nats)"),
            "value_drain_sink": C("float64", "||W_O^(h) v_k^(h)|| at the sink position k "
                                             "(Guo et al.)"),
            "value_drain_rest": C("float64", "mean over the other tokens of "
                                             "||W_O^(h) v_t^(h)||")}),
        "sinks": Table("prompt x position, flagged tokens only (Wong et al.)",
                       ("prompt_id", "pos"), {
            "prompt_id": C("int64", "key"), "pos": C("int64", "key"),
            "token": C("string", "the token's text"),
            "kind": C("string", "primary / secondary / noise"),
            "creation_layer": C("int64", "first layer where |cos(h_l[t], h_l[primary])| > "
                                         "cos_threshold"),
            "lifetime": C("int64", "number of such layers"),
            "max_cos": C("float64", "max |cos| to the primary over the searched layers (1 for "
                                    "the primary)")}),
    }

    def attention_options(self) -> dict:
        return {"k_pos": self.config.k_pos, "impl": self.config.impl, "block": self.config.block}

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self._attn = LayerBuffers(batch.n_layers)  # heads stats, received per token
        self._resid = LayerBuffers(batch.n_layers)  # candidate norms and cosines

    def observe(self, site: str, layer: int, payload) -> None:
        if site == "attention":
            self._attention(layer, payload)
        else:
            self._residual(layer, payload)

    def _attention(self, layer: int, stats: dict[str, torch.Tensor]) -> None:
        k = self.config.k_pos
        rows, heads = stats["sink_mass"].shape
        width = max(self.batch.lengths)
        norms = value_norms(stats["w_o"], stats["value"], heads)  # (B, H, S)
        for row, _, n in self.batch.rows():
            vn = norms[row, :, :n]  # (H, T)
            rest = torch.cat([vn[:, :k], vn[:, k + 1:]], dim=1)
            nan = torch.full((heads,), float("nan"))
            denom = heads * (n - torch.arange(n, device=vn.device))
            for name, value in {
                    "sink_mass": stats["sink_mass"][row],
                    "attn_entropy": stats["attn_entropy"][row],
                    "value_drain_sink": vn[:, k] if k < n else nan,
                    "value_drain_rest": rest.mean(-1) if rest.shape[1] else nan}.items():
                self._attn.put(name, layer, (row,), value, (rows, heads))
            self._attn.put("attn_received", layer, (row, slice(0, n)),
                           stats["received"][row, :n] / denom, (rows, width))

    def _residual(self, layer: int, h: torch.Tensor) -> None:
        rows, width = len(self.batch.lengths), max(self.batch.lengths)
        most = len(self.config.candidates)
        for row, _, n in self.batch.rows():
            cands = [c for c in self.config.candidates if c < n]
            x = h[row, :n].float()  # (T, D)
            ref = x[cands]  # (C, D)
            cos = torch.nn.functional.cosine_similarity(x[None], ref[:, None], dim=-1)  # (C, T)
            self._resid.put("norms", layer, (row, slice(0, len(cands))),
                            torch.linalg.vector_norm(ref, dim=-1), (rows, most))
            self._resid.put("cos", layer, (row, slice(0, len(cands)), slice(0, n)), cos,
                            (rows, most, width))

    def collect(self) -> dict[str, pd.DataFrame]:
        sinks, heads, received, nonfinite = [], [], [], []
        attn, resid, k = self._attn, self._resid, self.config.k_pos
        for layer in attn.layers:
            for row, prompt_id, n in self.batch.rows():
                checked = ["sink_mass", "attn_entropy"] + ["value_drain_sink"] * (k < n) \
                    + ["value_drain_rest"] * (n > 1)  # the drains are NaN by definition else
                nonfinite.append(nonfinite_row(self.name, "attention", prompt_id, layer,
                                               {c: attn[c][layer, row] for c in checked}))
                heads.append(pd.DataFrame({
                    "prompt_id": prompt_id, "layer": layer,
                    "head": np.arange(attn["sink_mass"].shape[-1]),
                    **{name: attn[name][layer, row] for name in
                       ("sink_mass", "attn_entropy", "value_drain_sink", "value_drain_rest")}}))
                received.append(pd.DataFrame({"prompt_id": prompt_id, "layer": layer,
                                              "pos": np.arange(n),
                                              "attn_received": attn["attn_received"][layer, row, :n]}))
        for row, prompt_id, n in self.batch.rows():
            cands = [c for c in self.config.candidates if c < n]
            cos = np.abs(resid["cos"][:, row, :len(cands), :n]).sum(1)  # (L, T)
            bad = [nonfinite_row(self.name, "resid_post", prompt_id, layer,
                                 {"cos_to_candidates": cos[layer]}) for layer in resid.layers]
            if any(bad):  # NaN norms and cosines would label sinks at random: none found
                nonfinite += bad
                continue
            found = secondary_sinks(resid["norms"][resid.layers, row, :len(cands)],
                                    resid["cos"][resid.layers, row, :len(cands), :n], cands,
                                    cos_threshold=self.config.cos_threshold,
                                    primary_margin=self.config.primary_margin,
                                    secondary_min=self.config.secondary_min)
            found.insert(0, "prompt_id", prompt_id)
            found.insert(2, "token", [self.batch.token_texts[row][p] for p in found.pos])
            sinks.append(found)
        self.begin(self.batch)  # forget this batch
        return {"heads": pd.concat(heads, ignore_index=True),
                "token_layers": pd.concat(received, ignore_index=True),
                "sinks": pd.concat(sinks, ignore_index=True) if sinks else None,
                "nonfinite": nonfinite_frame(nonfinite)}

    def summary(self, sql, stats: dict) -> dict:
        """Gu et al.'s sink rate over the run, with the prompt lengths it depends on (SQL over
        the whole run, `RUN_SINK_RATE`).

        A prompt with a non-finite sink mass at any (layer, head) is left out of the rate (its
        rate over the other heads would not be Gu et al.'s measure) and counted in
        `prompts_excluded`; the rate is None when no prompt is left."""
        rates = sql.sql(RUN_SINK_RATE, [self.config.eps]).iloc[0]
        lengths = sql.sql("SELECT min(n_tokens) AS lo, max(n_tokens) AS hi, "
                          "avg(n_tokens) AS mean FROM prompts").iloc[0]
        rate = rates.sink_rate
        return {"sink_rate": None if pd.isna(rate) else float(rate), "eps": self.config.eps,
                "k_pos": self.config.k_pos, "T_min": int(lengths.lo), "T_max": int(lengths.hi),
                "T_mean": float(lengths["mean"]), "prompts_excluded": int(rates.excluded),
                "heads_nonfinite": int(rates.heads_nonfinite)}

    def diagnostics(self, sql, stats: dict, meta: dict) -> list[str]:
        """When the labels or the rate mean less than they seem: a secondary band that cannot
        exist for this number of layers, a cosine criterion that marks most tokens as sinks
        (massive dims dominating every residual), and a sink rate measured far from Gu et
        al.'s T = 64."""
        cfg, n_layers, out = self.config, int(meta["n_layers"]), []
        top = n_layers - cfg.primary_margin  # secondary: secondary_min < lifetime < top
        if top <= cfg.secondary_min + 1:
            out.append(f"no secondary sink can exist here: with {n_layers} layers and "
                       f"primary_margin {cfg.primary_margin} a sink living more than "
                       f"{cfg.secondary_min} layers is already primary (lifetime >= {top}); "
                       f"lower --sinks-primary-margin (e.g. {max(1, n_layers // 2)}) for a "
                       "model this shallow")
        if sql.columns("sinks"):  # the table exists once any prompt had a flagged token
            row = sql.sql(f"SELECT (SELECT count(*) FROM sinks WHERE kind = 'primary' AND pos > "
                          f"{max(cfg.candidates)}) AS marked, (SELECT count(*) FROM tokens WHERE "
                          f"pos > {max(cfg.candidates)}) AS tokens, (SELECT median(max_cos) "
                          "FROM sinks) AS cos").iloc[0]
            marked, tokens = int(row.marked), int(row.tokens)
            if tokens >= 4 and marked > tokens / 2:
                out.append(f"{marked} of {tokens} tokens after the candidates "
                           f"({100 * marked / tokens:.0f}%) are labelled primary sinks "
                           f"(median max |cos| {row.cos:.2f}): the cosine criterion does not "
                           "separate tokens in this model (a few massive dims dominate every "
                           "residual), so `sinks.kind` says little here")
        lengths = sql.sql("SELECT min(n_tokens) AS lo, max(n_tokens) AS hi FROM prompts").iloc[0]
        if not (32 <= lengths.lo and lengths.hi <= 128):
            out.append(f"Gu et al. measure the sink rate at T = 64; these prompts have "
                       f"{int(lengths.lo)} to {int(lengths.hi)} tokens, and the rate depends on "
                       "T (--max-tokens 64 on prompts at least that long gives the paper's "
                       "setting)")
        return out
