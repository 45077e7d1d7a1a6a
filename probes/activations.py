"""Activation magnitudes of the residual stream and massive activations (Sun et al. 2024).

Sun, Chen, Kolter, Liu, "Massive Activations in Large Language Models" (COLM 2024),
code: locuslab/massive-activations. Statistics are taken on the residual stream after
each block (forward hooks on the decoder layers), never from HF's `hidden_states` tuple,
whose last entry is after the final norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tokenprobe.probe import (Batch, LayerBuffers, Probe, nonfinite_frame, nonfinite_row,
                              register)
from tokenprobe.tables import Column, Table


@dataclass(frozen=True)
class ActivationsConfig:
    """Massive-activation criterion of Sun et al. 2024.

    An entry h_l[t, d] is massive when |h_l[t, d]| > `abs_threshold` AND
    |h_l[t, d]| > `median_ratio` x median(|h_l|), the median over the whole layer tensor of
    that sequence (all its tokens and dims).

    Attributes:
        abs_threshold: a massive |h| exceeds this (paper: 100).
        median_ratio: and this multiple of the layer tensor's median |h| (paper: 1000).
    """

    abs_threshold: float = 100.0
    median_ratio: float = 1000.0


def lower_median(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Median as `torch.median` defines it: the lower of the two middle values for even counts.

    This is the median the authors' code takes (`torch.median` on the absolute activations).
    On CPU it is numpy's introselect (`np.partition`), the same element as `torch.median`
    about six times faster; tensors holding NaN keep `torch.median` (NaN is the median).
    """
    if x.device.type != "cpu" or x.numel() == 0 or bool(torch.isnan(x.sum())):  # a NaN -> nan sum
        return x.median() if dim is None else x.median(dim=dim).values
    flat = x.detach().reshape(-1) if dim is None else x.detach().movedim(dim, -1)
    k = (flat.shape[-1] - 1) // 2
    picked = np.partition(flat.numpy(), k, axis=-1)[..., k]
    return torch.from_numpy(np.array(picked)).to(x.dtype)  # np.array: a 0-d array for a scalar


def batch_medians(a: torch.Tensor, lengths: list[int], nan: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`lower_median`s of a right-padded batch of |h|, as the probe takes them in its hook.

    Args:
        a: (B, W, D) absolute residuals (>= 0 or NaN), float32 or float64.
        lengths: real tokens per row.
        nan: (B, W) True where a token's values hold a NaN (its max is NaN).

    Returns:
        (B, W) the median over D of each token, (B,) the median over each prompt's real tokens
        and dims; NaN where a NaN is among the values (torch.median's rule). On CPU by
        np.partition per token and `kth_smallest` per prompt (two threads bought nothing
        inside the forward: torch's own threads still hold the cores).
    """
    if a.device.type != "cpu":
        return a.median(-1).values, torch.stack([a[r, :n].median() for r, n in enumerate(lengths)])
    values, mid = a.detach().numpy(), (a.shape[-1] - 1) // 2
    # the values are >= 0 (or NaN, masked below): their bit patterns as signed integers order
    # as they do, and integers select faster (np.partition: 2.7 vs 3.3 ms a real 8x128 layer)
    x = values.view(np.int32 if values.dtype == np.float32 else np.int64)
    token = torch.from_numpy(np.partition(x, mid, axis=-1)[..., mid].view(values.dtype))
    prompt = torch.empty(len(lengths), dtype=a.dtype)
    for n in set(lengths):  # the prompts of one length in one selection (often all of them)
        rows = [r for r, m in enumerate(lengths) if m == n]
        same = x[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[-1] + 1)) else x[rows]
        mid_n = (n * x.shape[-1] - 1) // 2
        picked = kth_smallest(same[:, :n].reshape(len(rows), -1), mid_n)
        prompt[rows] = torch.from_numpy(picked.view(values.dtype))
    real = torch.arange(nan.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return (token.masked_fill(nan, math.nan),
            prompt.masked_fill((nan & real).any(-1), math.nan))


def kth_smallest(x: np.ndarray, k: int, *, step: int = 17, spread: float = 0.02
                 ) -> np.ndarray:
    """(R,) each row's k-th smallest of x (R, N), the element np.partition puts at k: selected
    among the values between two quantiles of a strided sample (k / N -+ `spread`), after
    counting that the k-th lies between them; a row whose count says it does not (a sample
    that misled) is partitioned whole. The sample's `step` is prime, so that it sees every
    residual dimension of a flattened (tokens x D) row (with 16 it saw 36 of 576, and missed).
    2.5-3x faster than np.partition on the residuals of a real batch (smollm2, 8 x 128)."""
    n = x.shape[1]
    if n < 64 * step:
        return np.partition(x, k, axis=-1)[:, k]
    sample = np.ascontiguousarray(x[:, ::step])
    q, last = k / (n - 1), sample.shape[1] - 1
    ranks = [max(0, int((q - spread) * last)), min(last, math.ceil((q + spread) * last))]
    lo, hi = np.partition(sample, ranks, axis=-1)[:, ranks].T.copy()
    below = np.count_nonzero(x < lo[:, None], axis=1)
    inside = (x >= lo[:, None]) & (x <= hi[:, None])
    out = np.empty(len(x), dtype=x.dtype)
    for r, row in enumerate(x):
        within = row[inside[r]]
        j = k - below[r]
        out[r] = np.partition(within, j)[j] if 0 <= j < len(within) else np.partition(row, k)[k]
    return out


def _widen(h: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the reductions (bf16/fp16 residuals are upcast, fp64 kept)."""
    return h if h.dtype == torch.float64 else h.float()


def residual_stats(h: torch.Tensor, lengths: list[int] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Per-token magnitude statistics of the residual stream at one layer.

    Args:
        h: (T, D) residual after a block, or (B, T, D) for a right-padded batch.
        lengths: with a batch, each row's real tokens: adds `layer_median` (B,), the lower
            median of |h| over the row's real tokens and dims (the massive criterion's).

    Returns:
        dict of (T,) or (B, T) tensors: `resid_norm` = ||h[t]||_2, `max_abs` = max_d |h[t, d]|,
        `max_abs_dim` its argmax (int64), `median_abs` = lower median_d |h[t, d]|,
        `cos_to_first` = cos(h[t], h[0]).
    """
    h = _widen(h)
    a = h.abs()
    max_abs, max_dim = a.max(dim=-1)
    norm = torch.linalg.vector_norm(h, dim=-1)
    if lengths is None:
        medians = {"median_abs": lower_median(a, dim=-1)}
    else:
        medians = dict(zip(("median_abs", "layer_median"),
                           batch_medians(a, lengths, max_abs.isnan())))
    return {
        "resid_norm": norm,
        "max_abs": max_abs,
        "max_abs_dim": max_dim,
        "median_abs": medians.pop("median_abs"),
        "cos_to_first": torch.linalg.vecdot(h, h[..., :1, :])
        / (norm * norm[..., :1]).clamp_min(1e-30),
        **medians,
    }


def massive_activations(h: torch.Tensor, *, abs_threshold: float = 100.0,
                        median_ratio: float = 1000.0) -> dict[str, torch.Tensor]:
    """Entries of one sequence's layer tensor that meet the Sun et al. criterion.

    Args:
        h: (T, D) residual after a block, real tokens only.
        abs_threshold: |h| must exceed this (paper: 100).
        median_ratio: |h| must exceed this multiple of the layer-tensor median of |h| (paper: 1000).

    Returns:
        dict of (N,) tensors `pos`, `dim`, `value` (signed h), `ratio_to_median` (|h| / median).
    """
    h = _widen(h)
    a = h.abs()
    median = lower_median(a)
    hit = (a > abs_threshold) & (a > median_ratio * median)
    pos, dim = hit.nonzero(as_tuple=True)
    return {"pos": pos, "dim": dim, "value": h[pos, dim], "ratio_to_median": a[pos, dim] / median}


C = Column


@register
class ActivationsProbe(Probe):
    """Hook adapter: residual statistics into `token_layers`, massive entries into `massive`."""

    name = "activations"
    sites = ("resid_post",)
    Config = ActivationsConfig
    tables = {
        "token_layers": {
            "resid_norm": C("float64", "||h_l[t]||_2 (Sun et al. 2024)"),
            "max_abs": C("float64", "max_d |h_l[t, d]|"),
            "max_abs_dim": C("int64", "argmax_d |h_l[t, d]|"),
            "median_abs": C("float64", "lower median_d |h_l[t, d]| (torch.median convention)"),
            "cos_to_first": C("float64", "cos(h_l[t], h_l[0]); 1 at pos 0")},
        "massive": Table("prompt x layer x position x dim; only entries meeting the criterion",
                         ("prompt_id", "layer", "pos", "dim"), {
            "prompt_id": C("int64", "key"), "layer": C("int64", "key"),
            "pos": C("int64", "key"), "dim": C("int64", "key: the residual dimension"),
            "value": C("float64", "signed h_l[t, d]"),
            "ratio_to_median": C("float64", "|h_l[t, d]| / lower median of |h_l| over the "
                                            "sequence's layer tensor")}),
    }

    def __init__(self, config: ActivationsConfig | None = None) -> None:
        super().__init__(config)
        self._massive: list[dict] = []

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self._stats = LayerBuffers(batch.n_layers)

    def observe(self, site: str, layer: int, tensor: torch.Tensor) -> None:
        """The batch's statistics at once over (B, W, D) (padding positions are reduced too
        and dropped in `collect`); the layer medians of the massive criterion per prompt."""
        lengths = self.batch.lengths
        width = max(lengths)
        h = _widen(tensor[:, :width])  # (B, W, D)
        stats = residual_stats(h, lengths)
        median = stats.pop("layer_median")
        for name, value in stats.items():
            self._stats.put(name, layer, (), value, (len(lengths), width))
        # |h| > abs_threshold and > median_ratio x median: above the larger (NaN median: none)
        bound = torch.clamp(self.config.median_ratio * median, min=self.config.abs_threshold)
        real = (torch.arange(width, device=h.device)[None, :]
                < torch.tensor(lengths, device=h.device)[:, None])  # (B, W)
        row, pos = ((stats["max_abs"] > bound[:, None]) & real).nonzero(as_tuple=True)
        value = h[row, pos]  # (K, D): the tokens with an entry above the bound
        hit, dim = (value.abs() > bound[row, None]).nonzero(as_tuple=True)
        if len(hit):
            row, pos, value = row[hit], pos[hit], value[hit, dim]
            ids = np.array(self.batch.prompt_ids, dtype=np.int64)
            self._massive.append({
                "prompt_id": ids[row.cpu().numpy()], "layer": np.full(len(pos), layer, np.int64),
                **{key: column.cpu().numpy() for key, column in (
                    ("pos", pos), ("dim", dim), ("value", value),
                    ("ratio_to_median", value.abs() / median[row]))}})

    def collect(self) -> dict[str, pd.DataFrame]:
        """The batch's tables, each built once: `token_layers` from the (L, B, T) buffers (rows:
        layer, prompt, position), `massive` from the entries found in the hooks."""
        stats, batch = self._stats, self.batch
        layers = np.array(stats.layers, dtype=np.int64)
        lengths = np.array(batch.lengths, dtype=np.int64)
        real = np.arange(max(batch.lengths)) < lengths[:, None]  # (B, T): not padding
        values = {name: array[layers] for name, array in stats.arrays.items()}  # (L, B, T)
        n = int(real.sum())
        token_layers = pd.DataFrame({
            "prompt_id": np.tile(np.repeat(np.array(batch.prompt_ids, dtype=np.int64), lengths),
                                 len(layers)),
            "layer": np.repeat(layers, n),
            **{name: value[:, real].reshape(-1) for name, value in values.items()},
            "pos": np.tile(np.nonzero(real)[1], len(layers))})
        checked = ("resid_norm", "max_abs", "median_abs", "cos_to_first")
        bad = np.zeros((len(layers), len(lengths)), dtype=bool)  # (L, B)
        for name in checked:
            bad |= (~np.isfinite(values[name]) & real).any(-1)
        nonfinite = nonfinite_frame([  # only where a value is not finite
            nonfinite_row(self.name, "resid_post", batch.prompt_ids[row], int(layers[i]),
                          {name: values[name][i, row, :lengths[row]] for name in checked})
            for i, row in zip(*np.nonzero(bad))])
        massive = _massive_frame(self._massive) if self._massive else None
        self._stats, self._massive = LayerBuffers(self.batch.n_layers), []
        return {"token_layers": token_layers, "massive": massive, "nonfinite": nonfinite}


def _massive_frame(found: list[dict]) -> pd.DataFrame:
    """Table `massive` from the hooks' finds: one dict of (N,) arrays per layer with entries."""
    return pd.DataFrame({key: np.concatenate([f[key] for f in found]) for key in found[0]})
