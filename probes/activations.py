"""Activation magnitudes of the residual stream and massive activations (Sun et al. 2024).

Sun, Chen, Kolter, Liu, "Massive Activations in Large Language Models" (COLM 2024),
code: locuslab/massive-activations. Statistics are taken on the residual stream after
each block (forward hooks on the decoder layers), never from HF's `hidden_states` tuple,
whose last entry is after the final norm.
"""
from __future__ import annotations

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


def _widen(h: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the reductions (bf16/fp16 residuals are upcast, fp64 kept)."""
    return h if h.dtype == torch.float64 else h.float()


def residual_stats(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token magnitude statistics of one sequence's residual stream at one layer.

    Args:
        h: (T, D) residual after a block, real tokens only (no padding).

    Returns:
        dict of (T,) tensors: `resid_norm` = ||h[t]||_2, `max_abs` = max_d |h[t, d]|,
        `max_abs_dim` its argmax (int64), `median_abs` = lower median_d |h[t, d]|,
        `cos_to_first` = cos(h[t], h[0]).
    """
    h = _widen(h)
    a = h.abs()
    max_abs, max_dim = a.max(dim=-1)
    norm = torch.linalg.vector_norm(h, dim=-1)
    return {
        "resid_norm": norm,
        "max_abs": max_abs,
        "max_abs_dim": max_dim,
        "median_abs": lower_median(a, dim=-1),
        "cos_to_first": (h @ h[0]) / (norm * norm[0]).clamp_min(1e-30),
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
        width = max(self.batch.lengths)
        for row, prompt_id, length in self.batch.rows():
            h = tensor[row, :length]  # (T, D) real tokens of this prompt
            for name, value in residual_stats(h).items():
                self._stats.put(name, layer, (row, slice(0, length)), value,
                                (len(self.batch.lengths), width))
            found = massive_activations(h, abs_threshold=self.config.abs_threshold,
                                        median_ratio=self.config.median_ratio)
            if len(found["pos"]):
                self._massive.append({"prompt_id": prompt_id, "layer": layer,
                                      **{k: v.cpu().numpy() for k, v in found.items()}})

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
    """Table `massive` from the hooks' finds: one dict per (prompt, layer) with entries, its
    arrays (N,) each."""
    counts = [len(f["pos"]) for f in found]
    return pd.DataFrame({
        "prompt_id": np.repeat(np.array([f["prompt_id"] for f in found], dtype=np.int64), counts),
        "layer": np.repeat(np.array([f["layer"] for f in found], dtype=np.int64), counts),
        **{key: np.concatenate([f[key] for f in found])
           for key in ("pos", "dim", "value", "ratio_to_median")}})
