"""Attention sinks: sink mass, attention entropy, value drains, attention received, secondary sinks.

Sources (definitions and defaults: README, "Measures"):
- Gu et al. 2024, "When Attention Sink Emerges in Language Models" (sail-sg/Attention-Sink,
  `compute_attention_sink`): alpha_k = (1/(T-k)) sum_{i>=k} A[i, k]; Sink_k^eps = 100 x share of
  (prompt, layer, head) with alpha_k > eps, eps = 0.3. It depends on T: always report T.
- Guo et al., "Active-Dormant Attention Heads" (GuoTianYu2000/Active-Dormant-Attention):
  value-state drain ||W_O^(h) v_t^(h)||.
- Wong et al., "On the Existence and Behaviour of Secondary Attention Sinks"
  (JeffreyWong20/Secondary-Attention-Sinks): secondary sinks by cosine to the primary sink's
  residual, as their code labels them (probes/sink_labels.py; table `sinks`).

tokenprobe's own variants, beside the papers' measures and named as not theirs: per-token labels
under a mean-centred cosine and a cosine without the primary's massive dims, with a `sink_like`
kind outside the searched layers (table `sink_labels`, probes/sink_labels.py), and
`attn_received_norm`, attention received relative to uniform causal attention.

Attention statistics are computed inside the model's attention call (tokenprobe.attention), a
block of queries at a time; residual statistics inside the block hooks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from tokenprobe.kernels.attention import IMPLS
from tokenprobe.probe import (Batch, LayerBuffers, Probe, nonfinite_frame, nonfinite_row,
                              register)
from tokenprobe.probes.sink_labels import (  # noqa: F401 (re-exported: sink_levels_of, ...)
    centered_cosines, cosines, label_columns, label_notes, lifetimes, nomassive_cosines,
    primary_of, secondary_sinks, sink_columns, sink_levels_of, sink_rows, token_labels)
from tokenprobe.probes.sink_measures import (  # re-exported: received_per_key, uniform_received
    RUN_SINK_RATE, head_grams, received_notes, received_per_key, uniform_received,
    value_norms)
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
        massive_top_k: dims removed for tokenprobe's `nomassive` criterion (table
            `sink_labels`): each candidate's massive_top_k largest |h_l| dims, at every layer
            (tokenprobe's: 2).
        sink_like_min: this many consecutive layers outside the searched ones with |cos| >
            cos_threshold make a token `sink_like` (table `sink_labels`; tokenprobe's: 5, the
            shortest lifetime Wong et al.'s defaults call secondary).
        block: queries per block in the attention statistics (None: 32).
        impl: attention-statistics implementation ("auto", "torch", "flash", "triton",
            "reference"; see kernels/attention.py).
    """

    k_pos: int = 0
    eps: float = 0.3
    candidates: tuple[int, ...] = (0, 1)
    cos_threshold: float = 0.9
    primary_margin: int = 15
    secondary_min: int = 4
    massive_top_k: int = 2
    sink_like_min: int = 5
    block: int | None = None
    impl: str = field(default="auto", metadata={"choices": IMPLS})

    def __post_init__(self) -> None:
        if min(self.k_pos, self.primary_margin, self.secondary_min, self.massive_top_k) < 0 \
                or min(1 if self.block is None else self.block, self.sink_like_min) < 1:
            raise ValueError("k_pos, primary_margin, secondary_min and massive_top_k must be "
                             ">= 0 and block (or None) and sink_like_min >= 1, got "
                             f"{self.k_pos}, {self.primary_margin}, {self.secondary_min}, "
                             f"{self.massive_top_k}, {self.block}, {self.sink_like_min}")
        if not (math.isfinite(self.eps) and 0 <= self.cos_threshold <= 1):
            raise ValueError(f"eps must be finite and cos_threshold in [0, 1], got {self.eps}, "
                             f"{self.cos_threshold}")


C = Column
CRITERIA = ("raw", "centered", "nomassive")  # the cosines of table `sink_labels`, in row order


@register
class SinksProbe(Probe):
    """Hook adapter: attention statistics into `heads` and `token_layers.attn_received(_norm)`,
    residual cosines into `sinks` (Wong et al.) and `sink_labels` (tokenprobe's variants)."""

    name = "sinks"
    sites = ("attention", "resid_post")
    Config = SinksConfig
    tables = {
        "token_layers": {
            "attn_received": C("float64", "mean over heads and queries i >= pos of "
                                          "A[l, h, i, pos]"),
            "attn_received_norm": C("float64", "attn_received / its value under uniform causal "
                                               "attention, mean_{i>=pos} 1/(i+1); 1: uniform "
                                               "(tokenprobe's, not a paper's)")},
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
        "sink_labels": Table(
            "prompt x position x criterion, every position from the primary sink on "
            "(tokenprobe's labels, not Wong et al.'s: theirs are table `sinks`)",
            ("prompt_id", "pos", "criterion"), {
                "prompt_id": C("int64", "key"), "pos": C("int64", "key"),
                "criterion": C("string", "key: the cosine: raw (of the residuals, as Wong et "
                                         "al.), centered (minus their mean over the positions "
                                         "not in candidates), nomassive (without the "
                                         "candidate's massive_top_k largest |h| dims)"),
                "token": C("string", "the token's text"),
                "kind": C("string", "primary / secondary by Wong et al.'s lifetime rules on "
                                    "this cosine, else sink_like (>= sink_like_min "
                                    "consecutive flagged layers outside the searched ones), "
                                    "else noise (flagged in them), else none"),
                "creation_layer": C("Int64", "first searched layer with |cos| > "
                                             "cos_threshold (NA: none)"),
                "lifetime": C("int64", "searched layers with |cos| > cos_threshold"),
                "max_cos": C("float64", "max |cos| to the primary over the searched layers (1 "
                                        "for the primary)"),
                "sink_like_first": C("Int64", "first layer of the longest run of flagged "
                                              "layers outside the searched ones (NA unless "
                                              "sink_like)"),
                "sink_like_last": C("Int64", "its last layer")}),
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
        k, lengths = self.config.k_pos, self.batch.lengths
        rows, heads = stats["sink_mass"].shape
        width = max(lengths)
        norms = value_norms(stats["w_o"], stats["value"], heads,
                            self._gram(layer, stats["w_o"], heads))[..., :width]  # (B, H, W)
        pos = torch.arange(width, device=norms.device)
        real = pos < torch.tensor(lengths, device=norms.device)[:, None]  # (B, W)
        rest = real & (pos != k)  # the drains' other tokens; none left: 0 / 0 = NaN
        sink = (norms[..., k] if k < width else norms.new_full((rows, heads), math.nan))
        for name, value in {
                "sink_mass": stats["sink_mass"], "attn_entropy": stats["attn_entropy"],
                "value_drain_sink": torch.where(real[:, k:k + 1], sink, math.nan)
                if k < width else sink,
                "value_drain_rest": torch.where(rest[:, None], norms, 0).sum(-1)
                / rest.sum(-1, keepdim=True)}.items():
            self._attn.put(name, layer, (), value, (rows, heads))
        self._attn.put("attn_received", layer, (), received_per_key(
            stats["received"][:, :width], heads, torch.tensor(lengths)), (rows, width))

    def _gram(self, layer: int, w_o: torch.Tensor, heads: int) -> torch.Tensor:
        """The layer's `head_grams`, computed again only when its W_O is another tensor or was
        changed in place (its version counter; an inference tensor has none: not kept)."""
        if w_o.is_inference():
            return head_grams(w_o, heads)
        grams = self.__dict__.setdefault("_grams", {})
        key = (w_o.data_ptr(), w_o._version, w_o.device, w_o.dtype, tuple(w_o.shape))
        if layer not in grams or grams[layer][0] != key:
            grams[layer] = (key, head_grams(w_o, heads))
        return grams[layer][1]

    def _residual(self, layer: int, h: torch.Tensor) -> None:
        """Candidate norms and the three cosines, for the rows holding every candidate at once,
        for shorter rows (fewer candidates) one at a time."""
        lengths, candidates = self.batch.lengths, list(self.config.candidates)
        full = [row for row, n in enumerate(lengths) if n > max(candidates)]
        groups = [(full, candidates)] if full else []
        groups += [([row], [c for c in candidates if c < n])
                   for row, n in enumerate(lengths) if n <= max(candidates)]
        shape = (len(lengths), len(candidates))
        for rows, cands in groups:
            width = max(lengths[row] for row in rows)
            n = torch.tensor([lengths[row] for row in rows])
            x = h[rows, :width].float()  # (R, W, D)
            ref = x[:, cands]  # (R, C, D)
            self._resid.put("norms", layer, (rows, slice(0, len(cands))),
                            torch.linalg.vector_norm(ref, dim=-1), shape)
            for name, cos in zip(CRITERIA, (  # (R, C, W) each (padding: dropped in collect)
                    cosines(x, ref),
                    centered_cosines(x, cands, n),
                    nomassive_cosines(x, cands, top_k=self.config.massive_top_k))):
                self._resid.put(name, layer, (rows, slice(0, len(cands)), slice(0, width)),
                                cos, (*shape, max(lengths)))

    def collect(self) -> dict[str, pd.DataFrame]:
        """The batch's tables, each built once from the layer buffers (rows: layer, prompt,
        then head or position; `sinks` and `sink_labels` prompt by prompt)."""
        heads, received, nonfinite = self._attention_tables()
        sinks, labels, bad = self._residual_tables()
        self.begin(self.batch)  # forget this batch
        return {"heads": heads, "token_layers": received, "sinks": sinks,
                "sink_labels": labels, "nonfinite": nonfinite_frame(nonfinite + bad)}

    def _attention_tables(self) -> tuple[pd.DataFrame, pd.DataFrame, list[dict | None]]:
        """`heads` and `token_layers.attn_received(_norm)` of the batch, and the `nonfinite`
        rows of its attention statistics."""
        attn, k, batch = self._attn, self.config.k_pos, self.batch
        layers = np.array(attn.layers, dtype=np.int64)
        ids = np.array(batch.prompt_ids, dtype=np.int64)
        lengths = np.array(batch.lengths, dtype=np.int64)
        n_layers, (rows, n_heads) = len(layers), attn["sink_mass"].shape[1:]
        names = ("sink_mass", "attn_entropy", "value_drain_sink", "value_drain_rest")
        stats = {name: attn[name][layers] for name in names}  # (L, B, H) each
        heads = pd.DataFrame({
            "prompt_id": np.tile(np.repeat(ids, n_heads), n_layers),
            "layer": np.repeat(layers, rows * n_heads),
            "head": np.tile(np.arange(n_heads), n_layers * rows),
            **{name: value.reshape(-1) for name, value in stats.items()}})
        real = np.arange(attn["attn_received"].shape[-1]) < lengths[:, None]  # (B, W)
        mean = attn["attn_received"][layers][:, real]  # (L, N): layer, prompt, position
        uniform = np.concatenate([uniform_received(n) for n in batch.lengths])  # (N,)
        received = pd.DataFrame({
            "prompt_id": np.tile(np.repeat(ids, lengths), n_layers),
            "layer": np.repeat(layers, mean.shape[1]),
            "pos": np.tile(np.nonzero(real)[1], n_layers),
            "attn_received": mean.reshape(-1), "attn_received_norm": (mean / uniform).reshape(-1)})
        every = np.ones(rows, dtype=bool)
        applies = {"sink_mass": every, "attn_entropy": every, "value_drain_sink": k < lengths,
                   "value_drain_rest": lengths > 1}  # (B,): the drains are NaN by definition else
        bad = np.zeros((n_layers, rows), dtype=bool)  # (L, B)
        for name, where in applies.items():
            bad |= ~np.isfinite(stats[name]).all(-1) & where
        nonfinite = [nonfinite_row(self.name, "attention", batch.prompt_ids[row], int(layers[i]),
                                   {c: stats[c][i, row] for c, w in applies.items() if w[row]})
                     for i, row in zip(*np.nonzero(bad))]  # only where a value is not finite
        return heads, received, nonfinite

    def _residual_tables(self) -> tuple[pd.DataFrame | None, pd.DataFrame | None,
                                        list[dict | None]]:
        """`sinks` and `sink_labels` of the batch from the candidates' residual norms and
        cosines, and the `nonfinite` rows of prompts whose cosines are not finite (no sinks
        are labelled from those)."""
        cfg, resid, batch = self.config, self._resid, self.batch
        layers, nonfinite = resid.layers, []
        kept, chosen, primary, start, end = [], [], [], [], []
        for row, prompt_id, n in batch.rows():  # a few numbers per prompt, no table
            count = sum(c < n for c in cfg.candidates)
            if not np.isfinite(resid["raw"][layers, row, :count, :n]).all():
                cos = np.abs(resid["raw"][:, row, :count, :n]).sum(1)  # (L, T)
                bad = [nonfinite_row(self.name, "resid_post", prompt_id, layer,
                                     {"cos_to_candidates": cos[layer]}) for layer in layers]
                if any(bad):  # NaN norms and cosines would label sinks at random: none found
                    nonfinite += bad
                    continue
            found = primary_of(resid["norms"][layers, row, :count],
                               [c for c in cfg.candidates if c < n])
            for value, into in zip((row, *found), (kept, chosen, primary, start, end)):
                into.append(value)
        if not kept:
            return None, None, nonfinite
        kept = np.array(kept, dtype=np.int64)
        crit = len(CRITERIA)
        absolute = np.abs(np.stack([  # (P, K, L, T): prompt, criterion, layer, position
            resid[c][np.array(layers)[:, None], kept[None], np.array(chosen)[None]]
            for c in CRITERIA]).transpose(2, 0, 1, 3))
        width = absolute.shape[-1]
        primary, start, end = (np.array(v, dtype=np.int64) for v in (primary, start, end))
        lengths = np.array(batch.lengths, dtype=np.int64)[kept]
        pos = np.arange(width)
        keep = (pos >= primary[:, None]) & (pos < lengths[:, None])  # (P, T)
        stats = lifetimes(absolute.reshape(-1, len(layers), width), np.repeat(start, crit),
                          np.repeat(end, crit), cos_threshold=cfg.cos_threshold)
        texts = np.array(list(itertools.chain.from_iterable(batch.token_texts)), dtype=object)
        at = (np.cumsum(batch.lengths) - batch.lengths)[kept][:, None] + pos  # (P, T) in texts
        ids = np.array(batch.prompt_ids, dtype=np.int64)[kept][:, None]  # (P, 1)
        rules = {"primary_margin": cfg.primary_margin, "secondary_min": cfg.secondary_min}
        raw = {name: value[::crit] for name, value in stats.items()}  # criterion "raw"
        rows = sink_rows(raw, primary, keep)  # (P, T)
        sinks = pd.DataFrame({"prompt_id": np.broadcast_to(ids, rows.shape)[rows],
                              **sink_columns(raw, primary, start, end, rows, len(layers),
                                             **rules)})
        sinks.insert(2, "token", texts[at[rows]])
        rows = np.repeat(keep, crit, axis=0)  # (P K, T): every position from the primary on
        labels = pd.DataFrame(label_columns(
            stats, np.repeat(primary, crit), np.repeat(start, crit), np.repeat(end, crit), rows,
            len(layers), **rules, sink_like_min=cfg.sink_like_min))
        labels["prompt_id"] = np.broadcast_to(np.repeat(ids, crit, axis=0), rows.shape)[rows]
        criteria = np.tile(np.array(CRITERIA, dtype=object), len(kept))[:, None]  # (P K, 1)
        labels["criterion"] = np.broadcast_to(criteria, rows.shape)[rows]
        labels["token"] = texts[np.repeat(at, crit, axis=0)[rows]]
        return sinks, labels, nonfinite

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
        (massive dims dominating every residual), what tokenprobe's variants label then, tokens
        that behave like sinks outside the searched layers (`label_notes`), attention received
        peaking at the last positions (`received_notes`), and a sink rate measured far from Gu
        et al.'s T = 64."""
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
        if sql.columns("sink_labels"):
            out += label_notes(sql, max(cfg.candidates))
        if "attn_received_norm" in sql.columns("token_layers"):
            out += received_notes(sql, max(cfg.candidates))
        lengths = sql.sql("SELECT min(n_tokens) AS lo, max(n_tokens) AS hi FROM prompts").iloc[0]
        if not (32 <= lengths.lo and lengths.hi <= 128):
            out.append(f"Gu et al. measure the sink rate at T = 64; these prompts have "
                       f"{int(lengths.lo)} to {int(lengths.hi)} tokens, and the rate depends on "
                       "T (--max-tokens 64 on prompts at least that long gives the paper's "
                       "setting)")
        return out
