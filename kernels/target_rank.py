"""The target's log-prob and rank in `linear_entropy` (both paths): an estimate t~ of the
target's logit by separate dot products, the rounding band around it within which a count
against t~ may differ from a count against the tile's own value, the torch path's logits kept
from inside it, and the outputs."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenprobe.kernels.common import tanh_cap

BAND = 1e-5  # the target-rank band: estimate +- BAND (|estimate| + 1), about ten float32 ulps


def _target_estimate(hidden, weight, bias, softcap, targets, work, chunk) -> Tensor:
    """(T,) the target logits by separate dot products, the estimate t~ (token 0 where none)."""
    out = torch.empty(hidden.shape[0], dtype=work, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        idx = targets[a:a + chunk].clamp(min=0)
        t = (hidden[a:a + chunk].to(work) * weight[idx].to(work)).sum(-1)  # (Tc,)
        if bias is not None:
            t = t + bias[idx].to(work)
        out[a:a + chunk] = tanh_cap(t, softcap)
    return out


def _resolved(estimate: Tensor, hit: Tensor, above: Tensor, below: Tensor) -> Tensor:
    """(T,) True where counting against the estimate t~ equals counting against the tile's value
    `hit`: no other logit in (t~, hit] (when hit >= t~) or in (hit, t~] (when hit < t~)."""
    return torch.where(hit >= estimate, above > hit, below <= hit)


def _target_outputs(targets: Tensor, hit: Tensor, count: Tensor, lse: Tensor) -> dict[str, Tensor]:
    """log p[target] and 1 + count, NaN and 0 where there is no target."""
    has = targets >= 0
    return {"target_logprob": torch.where(has, hit - lse, math.nan),
            "target_rank": torch.where(has, 1 + count.long(), 0)}


def _keep_band(band: list, logits: Tensor, tgt: Tensor, ref: Tensor, counted: Tensor,
               near: Tensor) -> None:
    """Append to `band` the tile's logits inside the band (lo, hi] of the rows that have one
    other than the target: their count `near - counted` (the tile's logits above lo less those
    above hi, the target left out) is positive: 2-4% of the rows of real text, so that a near-tie
    costs a gather, not a second sweep. The target's own value may be among them (it is never
    above itself)."""
    rows = ((near > counted) & (tgt >= 0)).nonzero()[:, 0]
    if len(rows) == 0:
        return
    tile, (lo, hi) = logits[rows], ref[rows].unbind(1)
    at = ((tile > lo[:, None]) & (tile <= hi[:, None])).nonzero()
    band.append((rows[at[:, 0]], tile[at[:, 0], at[:, 1]]))
