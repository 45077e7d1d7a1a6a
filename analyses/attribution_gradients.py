"""Gradient attribution of a target to a prompt's tokens: saliency, input x gradient and
integrated gradients over the input embeddings, and their aggregation to prompt units."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tokenprobe.analyses.attribution_targets import Target, embed, score_embeds
from tokenprobe.analyses.attribution_units import Unit
from tokenprobe.models import LoadedModel

IG_METHODS = ("gausslegendre", "riemann_trapezoid")
BASELINES = ("zero", "pad", "mask")


def _grad(loaded: LoadedModel, embeds: torch.Tensor, target: Target
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f per row (B,), d f / d embeds (B, T, d)) for a batch of same-length rows."""
    with torch.enable_grad():
        x = embeds.detach().clone().requires_grad_(True)
        f = score_embeds(loaded, x, torch.ones(x.shape[:2], device=x.device), target)
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g.detach()


def gradients(loaded: LoadedModel, prompt_ids: Sequence[int], target: Target) -> np.ndarray:
    """(T, d) float64 d f / d e_t of the prompt's input embeddings (see `embed`)."""
    e = embed(loaded, list(prompt_ids)).detach()[None]  # (1, T, d)
    return _grad(loaded, e, target)[1][0].double().cpu().numpy()


def saliency(loaded: LoadedModel, prompt_ids: Sequence[int], target: Target) -> np.ndarray:
    """Saliency (Simonyan, Vedaldi, Zisserman 2014, "Deep Inside Convolutional Networks"): per
    token, the L2 norm over the embedding dimension of d f / d e_t, (T,) float64, >= 0.

    Captum's `Saliency` (abs=True) returns |d f / d e| per embedding dimension; inseq's
    "saliency" then reduces the last dimension with an L2 norm (its default aggregation).
    This follows that convention: ||d f / d e_t||_2."""
    return np.linalg.norm(gradients(loaded, prompt_ids, target), axis=-1)


def input_x_gradient(loaded: LoadedModel, prompt_ids: Sequence[int], target: Target
                     ) -> np.ndarray:
    """Input x gradient (Shrikumar et al. 2016, "Not Just a Black Box"): per token,
    sum_k e_tk * d f / d e_tk, (T,) float64 (signed; Captum's `InputXGradient` on the input
    embeddings summed over the embedding dimension, as inseq's "input_x_gradient" does)."""
    e = embed(loaded, list(prompt_ids)).detach()
    g = _grad(loaded, e[None], target)[1][0]
    return (e.double() * g.double()).sum(-1).cpu().numpy()


def ig_parameters(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step weights) of the path integral's quadrature on [0, 1], as Captum's
    `approximation_parameters`: Gauss-Legendre nodes and half-weights, or the trapezoid rule
    on `steps` equally spaced points (weights 1/(steps-1), halved at the ends)."""
    if steps < 2 and method == "riemann_trapezoid":
        raise ValueError("riemann_trapezoid needs steps >= 2")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1), 0.5 * w
    if method == "riemann_trapezoid":
        alphas = np.linspace(0, 1, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] *= 0.5
        return alphas, w
    raise ValueError(f"unknown method {method!r}; use one of {IG_METHODS}")


def fill_token_id(tokenizer, kind: str, what: str) -> int:
    """The token that stands in for absent input: "pad" (the pad token, else eos) or "mask"
    (the mask token, else unk); ValueError naming `what` (baseline, filler) without one."""
    if kind == "pad":
        fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    else:
        fill = getattr(tokenizer, "mask_token_id", None)
        fill = fill if fill is not None else tokenizer.unk_token_id
    if fill is None:
        raise ValueError(f"the tokenizer has no {kind} token for the {kind!r} {what}"
                         + (" (nor unk)" if kind == "mask" else " (nor eos)"))
    return int(fill)


def baseline_ids(loaded: LoadedModel, prompt_ids: Sequence[int], baseline: str
                 ) -> list[int] | None:
    """The baseline's token ids (None for "zero"), special positions kept as in the prompt.

    "pad": the pad token (the eos token when the tokenizer has no pad token); "mask": the
    mask token, else the unk token (ValueError when there is neither); any other string is a
    text with exactly as many tokens as the prompt (tokenised the same way, ValueError else).
    """
    tok = loaded.tokenizer
    special = set(tok.all_special_ids)
    ids = list(prompt_ids)
    if baseline == "zero":
        return None
    if baseline in ("pad", "mask"):
        fill = fill_token_id(tok, baseline, "baseline")
        return [i if i in special else fill for i in ids]
    other = list(tok(baseline)["input_ids"])
    if len(other) != len(ids):
        raise ValueError(f"the baseline text has {len(other)} tokens, the prompt {len(ids)}; "
                         "they must match")
    return [i if i in special else j for i, j in zip(ids, other)]


def integrated_gradients(loaded: LoadedModel, prompt_ids: Sequence[int], target: Target, *,
                         baseline: str = "zero", steps: int = 50,
                         method: str = "gausslegendre", batch_size: int = 16,
                         progress=None) -> tuple[np.ndarray, float]:
    """Integrated gradients (Sundararajan, Taly, Yan 2017, "Axiomatic Attribution for Deep
    Networks") over the input embeddings, per token:
    (e_t - b_t) . sum_k w_k d f / d e_t (b + a_k (e - b)), summed over the embedding dimension.

    Defaults are Captum's (`LayerIntegratedGradients` on the embedding layer): n_steps = 50,
    method "gausslegendre". Special tokens (BOS) keep their own embedding in the baseline, so
    their attribution is 0; "zero" zeroes every other token's embedding.

    Args:
        baseline: "zero", "pad", "mask" or a text of as many tokens (`baseline_ids`).
        steps: quadrature points on the straight path.
        method: "gausslegendre" or "riemann_trapezoid" (`ig_parameters`).
        batch_size: path points per forward and backward.
        progress: optional tqdm bar (or callable), updated with the points done per batch.

    Returns:
        ((T,) float64 attributions, completeness gap f(x) - f(baseline) - sum(attributions)).
    """
    ids = list(prompt_ids)
    alphas, weights = ig_parameters(steps, method)
    x = embed(loaded, ids).detach()  # (T, d)
    b_ids = baseline_ids(loaded, ids, baseline)
    if b_ids is None:
        special = set(loaded.tokenizer.all_special_ids)
        keep = torch.tensor([i in special for i in ids], device=x.device)[:, None]
        b = torch.where(keep, x, torch.zeros_like(x))
    else:
        b = embed(loaded, b_ids).detach()
    total = torch.zeros_like(x, dtype=torch.float64)
    update = getattr(progress, "update", progress)
    for a in range(0, steps, batch_size):
        al = torch.tensor(alphas[a:a + batch_size], dtype=x.dtype, device=x.device)
        w = torch.tensor(weights[a:a + batch_size], dtype=torch.float64, device=x.device)
        path = b + al[:, None, None] * (x - b)  # (k, T, d)
        _, g = _grad(loaded, path, target)
        total += (w[:, None, None] * g.double()).sum(0)
        if update is not None:
            update(len(al))
    attr = ((x - b).double() * total).sum(-1).cpu().numpy()
    with torch.no_grad():
        ends = score_embeds(loaded, torch.stack([x, b]), torch.ones(2, len(ids)), target)
    gap = float(ends[0] - ends[1]) - float(attr.sum())
    return attr, gap


def to_units(values: np.ndarray, units: Sequence[Unit], method: str) -> np.ndarray:
    """Per-token attributions aggregated to units, (n_units,) float64.

    "input_x_gradient" and "integrated_gradients" are additive: a unit gets the sum of its
    tokens' values. "saliency" values are gradient L2 norms: a unit gets the L2 norm of its
    tokens' stacked gradients, sqrt(sum_t ||g_t||^2), i.e. the root of the sum of squares of
    the per-token norms. Special tokens (in no unit) are left out."""
    v = np.asarray(values, dtype=np.float64)
    if method in ("input_x_gradient", "integrated_gradients"):
        return np.array([v[list(u.positions)].sum() for u in units])
    if method == "saliency":
        return np.array([np.sqrt((v[list(u.positions)] ** 2).sum()) for u in units])
    raise ValueError(f"unknown method {method!r}; use saliency, input_x_gradient or "
                     "integrated_gradients")
