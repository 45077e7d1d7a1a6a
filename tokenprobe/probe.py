"""The probe protocol: what a probe declares, and the batch it sees inside the hooks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

# Sites the runner can hook.
# `resid_post`: the residual stream after block `layer`, a (B, T, D) tensor.
# `attention`: statistics computed inside the attention call of layer `layer` (see
#   tokenprobe.attention): a dict of sink_mass (B, H), attn_entropy (B, H), received (B, S) and
#   value_norm (B, H, S). Needs the transformers entry point.
SITES = ("resid_post", "attention")


@dataclass(frozen=True)
class Batch:
    """One padded batch of prompts, right-padded.

    Attributes:
        prompt_ids: the run-wide id of each row.
        input_ids: (B, T) token ids; pad positions hold the pad id.
        attention_mask: (B, T) 1 at real tokens, 0 at padding.
        lengths: number of real tokens of each row.
        token_texts: readable text of each real token of each row.
        n_layers: the model's number of blocks (layers are 0 .. n_layers - 1).
    """

    prompt_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    token_texts: list[list[str]]
    n_layers: int


class LayerBuffers:
    """Per-batch arrays that a probe fills layer by layer from inside the hooks.

    What a probe keeps per layer is small (a value per token or head), but kept as many small
    allocations it lands in the holes that the forward's large temporaries leave in the heap,
    and glibc then cannot reuse those holes for the next layer's temporaries: on smollm2-135m
    at T = 2048 that raised the activations probe's peak RSS by about 200 MB. Each array here
    is allocated once, on its first write (by then only the first block's temporaries exist),
    with room for every layer: [n_layers, *shape]. Unwritten entries are NaN (floats) or 0.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.arrays: dict[str, np.ndarray] = {}
        self.layers: list[int] = []  # the layers written, in the order first seen

    def put(self, name: str, layer: int, index: tuple, value: torch.Tensor | np.ndarray,
            shape: tuple[int, ...]) -> None:
        """Write `value` at [layer, *index] of array `name`, creating it with `shape` (the
        shape after the layer axis) and `value`'s dtype when it does not exist yet."""
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if name not in self.arrays:
            dtype = np.result_type(value)
            fill = np.nan if np.issubdtype(dtype, np.floating) else 0
            self.arrays[name] = np.full((self.n_layers, *shape), fill, dtype=dtype)
        if layer not in self.layers:
            self.layers.append(layer)
        self.arrays[name][(layer, *index)] = value

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def nonfinite_row(probe: str, site: str, prompt_id: int, layer: int,
                  values: dict[str, np.ndarray], *, offset: int = 0) -> dict | None:
    """One `nonfinite` row when the statistics a probe reduced for one prompt at one site and
    layer hold NaN or +-inf, else None.

    A check on what the probe already reduced (a value per token or head), never a new pass
    over the activations; a NaN or inf there means the model's own numbers overflowed or were
    NaN (e.g. float16 residuals past 65504, a NaN in an embedding).

    Args:
        probe, site: who reduced the values, and where (resid_post, attention, logits, lens).
        values: statistic name -> (N,) array over the same N positions or heads.
        offset: the position (or head) of the arrays' first entry.
    """
    stacked = np.stack([np.asarray(v, dtype=float) for v in values.values()])  # (S, N)
    bad = ~np.isfinite(stacked)
    if not bad.any():
        return None
    per_item = bad.any(axis=0)
    return {"prompt_id": prompt_id, "layer": layer, "probe": probe, "site": site,
            "n_checked": int(stacked.shape[1]), "n_nonfinite": int(per_item.sum()),
            "first_index": offset + int(np.argmax(per_item)), "n_nan": int(np.isnan(stacked).sum()),
            "n_inf": int(np.isinf(stacked).sum()),
            "statistics": ",".join(n for n, b in zip(values, bad.any(axis=1)) if b)}


def nonfinite_frame(rows: list[dict | None]) -> pd.DataFrame | None:
    """The `nonfinite` table part of a batch from `nonfinite_row` results (None: all finite)."""
    rows = [r for r in rows if r is not None]
    return pd.DataFrame(rows) if rows else None


class Probe:
    """Base class: a probe reduces hooked tensors to rows and returns tables per batch.

    A subclass sets `name`, `sites` (a subset of `SITES`) and `config` (a frozen dataclass),
    and implements `observe` (called inside the hook; must reduce and keep only small
    tensors) and `collect` (turn what `observe` kept into DataFrames, then forget it).
    """

    name: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]
    config: object

    def bind(self, model, tokenizer) -> None:
        """Called once before the first batch with the transformers model being probed (also
        under TransformerBridge and nnsight) and its tokenizer; e.g. to find the unembedding."""

    def begin(self, batch: Batch) -> None:
        """Called before the forward pass of each batch."""
        self.batch = batch

    def observe(self, site: str, layer: int, tensor) -> None:
        """Reduce `tensor` (hooked at `site`, block `layer`; a dict for `attention`) inside the
        hook."""
        raise NotImplementedError

    def collect(self) -> dict[str, pd.DataFrame]:
        """Tables for the batch just run, keyed by table name; resets per-batch state."""
        raise NotImplementedError

    def finalize(self, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Columns that need the whole run (e.g. per-run quantiles), added to the merged tables
        before they are saved; returns the tables (unchanged by default)."""
        return tables

    def summary(self, tables: dict[str, pd.DataFrame]) -> dict:
        """Run-level figures from the finished tables, stored in run.json (none by default)."""
        return {}

    def describe(self) -> dict:
        """The probe's name and configuration, for run metadata."""
        return {"name": self.name, **dataclasses.asdict(self.config)}
