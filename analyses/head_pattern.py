"""One head's full attention pattern on a short prompt, computed for display (never stored).

`head_pattern(loaded, ids, layer, head)` runs one forward through the model's own attention
(`tokenprobe.attention`, registered with transformers' `AttentionInterface`, so the q and k
it sees are post-RoPE with the model's causal / sliding-window mask), computes the softmax of
the one chosen head at the one chosen layer (`head_probs`, the pure reduction; GQA maps the
head to its key-value head) and stops the forward there: later layers never run and no other
layer's or head's [T, T] pattern is built. Prompts over `MAX_TOKENS` are refused.

The rest of the module shapes it for the dashboard (CircuitsVis-style): the prompt's ids and
the sink keys of a run's prompt, the query x key heatmap with the sink column marked, and the
prompt's tokens coloured by the attention one query gives each key.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tokenprobe import attention  # registers the "tokenprobe" attention function
from tokenprobe.kernels.common import tanh_cap
from tokenprobe.models import LoadedModel
from tokenprobe.placement import input_device
from tokenprobe.store import Run

MAX_TOKENS = 512  # T x T float32 is 1 MiB: a heatmap a browser can still hover
NAME = "tokenprobe_head_pattern"


class PromptTooLong(ValueError):
    """A prompt longer than `MAX_TOKENS`: its full pattern is not computed for display."""


def check_length(n_tokens: int, limit: int = MAX_TOKENS) -> None:
    """Raise PromptTooLong for a prompt of more than `limit` tokens (the message says why)."""
    if n_tokens > limit:
        raise PromptTooLong(
            f"the prompt has {n_tokens} tokens; one head's full attention pattern is shown "
            f"only for prompts up to {limit} tokens (a {n_tokens} x {n_tokens} heatmap); use "
            "the Heads tab's per-head measures, or a shorter prompt")
    if n_tokens < 1:
        raise ValueError("the prompt has no tokens")


def head_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, scaling: float,
               softcap: float | None = None) -> torch.Tensor:
    """Softmax attention probabilities of one head.

    Args:
        q: (T, Dh) post-RoPE queries of the head.
        k: (S, Dh) post-RoPE keys of its key-value head (S >= T; the queries are the last T).
        mask: (T, S) bool, True where query i may attend to key j (the model's causal,
            padding or sliding-window mask), or None for plain causal.
        scaling: multiplier of q.k (e.g. Dh ** -0.5; Gemma 3: query_pre_attn_scalar ** -0.5).
        softcap: attention logit soft-capping (Gemma 2), None for none.

    Returns:
        (T, S) float32 (float64 for float64 inputs) probabilities, each row summing to 1
        (a row with no allowed key is all 0).
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    t, s = q.shape[0], k.shape[0]
    scores = tanh_cap(q.to(work) @ k.to(work).T * scaling, softcap)  # (T, S)
    if mask is None:
        mask = attention.causal_mask(t, s, q.device)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)


@dataclass
class _Target:
    layer: int
    head: int
    pattern: torch.Tensor | None = None


class _Captured(Exception):
    """Raised by the attention function once the target head is reduced: ends the forward."""


_TARGET: contextvars.ContextVar[_Target] = contextvars.ContextVar("tokenprobe_head_pattern")


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, softcap: float | None = None, **kwargs: object):
    target = _TARGET.get(None)
    if target is None or module.layer_idx != target.layer:  # the model's attention, unchanged
        return ALL_ATTENTION_FUNCTIONS[attention.NAME](
            module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)
    groups = query.shape[1] // key.shape[1]  # GQA: query heads per key-value head
    mask = attention.bool_mask(attention_mask, key.shape[-2])
    mask = None if mask is None else mask[0, 0]  # (T, S)
    target.pattern = head_probs(query[0, target.head], key[0, target.head // groups], mask,
                                scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
                                softcap=softcap)
    raise _Captured


AttentionInterface.register(NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the model's masks as bool or None


@contextlib.contextmanager
def _capturing(model: torch.nn.Module, target: _Target) -> Iterator[None]:
    previous = model.config._attn_implementation
    token = _TARGET.set(target)
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _TARGET.reset(token)


def head_counts(loaded: LoadedModel) -> tuple[int, int]:
    """(layers, query heads per layer) of the model."""
    config = loaded.model.config
    config = getattr(config, "text_config", config)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def head_pattern(loaded: LoadedModel, ids: Sequence[int] | torch.Tensor, layer: int,
                 head: int) -> np.ndarray:
    """The attention pattern of `head` at `layer` on one prompt: A[i, j], query i, key j.

    Args:
        loaded: the model (`tokenprobe.load`).
        ids: the prompt's token ids, (T,), T <= MAX_TOKENS, as tokenised (BOS included).
        layer, head: 0-based; `head` is a query head (GQA handled).

    Returns:
        (T, T) float32 array; row i sums to 1 over the keys query i may see (causal, and the
        sliding window on a sliding-window layer), 0 elsewhere.

    Raises:
        PromptTooLong: more than MAX_TOKENS ids. ValueError: no such layer or head.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    check_length(len(ids))
    n_layers, n_heads = head_counts(loaded)
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ValueError(f"no head ({layer}, {head}) in a model with {n_layers} layers x "
                         f"{n_heads} heads")
    target = _Target(layer, head)
    with torch.inference_mode(), _capturing(loaded.model, target):
        try:
            loaded.model(input_ids=ids[None].to(input_device(loaded.model)), use_cache=False)
        except _Captured:
            pass
    if target.pattern is None:
        raise RuntimeError(f"layer {layer}'s attention never ran through {NAME}")
    return target.pattern.float().cpu().numpy()


# ---- shaping for the dashboard ---------------------------------------------------------------

def prompt_ids(run: Run, prompt_id: int) -> list[int]:
    """The prompt's token ids as the run tokenised them, in position order."""
    tokens = run.tokens[run.tokens.prompt_id == prompt_id].sort_values("pos")
    return [int(i) for i in tokens.token_id]


def sink_keys(run: Run, prompt_id: int) -> dict[int, str]:
    """{key position: why it is marked}: the key whose received mass is the sink rate's
    (the sinks probe's k_pos, 0 by default) and the prompt's primary sinks (sinks table)."""
    config = next((p for p in run.meta.get("probes", []) if isinstance(p, dict)
                   and p.get("name") == "sinks"), {})
    keys = {int(config.get("k_pos", 0)): "sink key (k_pos)"}
    sinks = run.tables.get("sinks")
    if sinks is not None and {"pos", "kind"} <= set(sinks.columns):
        for pos in sinks.pos[(sinks.prompt_id == prompt_id) & (sinks.kind == "primary")]:
            keys[int(pos)] = ("sink key (k_pos), primary sink" if int(pos) in keys
                              else "primary sink")
    return dict(sorted(keys.items()))


def pattern_figure(pattern: np.ndarray, labels: list[str], *, title: str,
                   sinks: dict[int, str]) -> go.Figure:
    """The (T, T) pattern as a query x key heatmap (query 0 at the top, like CircuitsVis), the
    tokens on both axes, exact values on hover, each sink column outlined and labelled."""
    ticks = [f"{i}:{t}" for i, t in enumerate(labels)]
    t = len(ticks)
    key_grid = np.broadcast_to(np.arange(t), (t, t))
    fig = go.Figure(go.Heatmap(
        z=pattern, x=ticks, y=ticks, customdata=key_grid, colorscale="Blues", zmin=0,
        colorbar={"title": {"text": "attention"}},
        hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4g}<extra></extra>"))
    for pos, why in sinks.items():
        if pos < t:
            fig.add_shape(type="rect", x0=pos - 0.5, x1=pos + 0.5, y0=-0.5, y1=t - 0.5,
                          xref="x", yref="y", line={"color": "#d62728", "width": 2})
            fig.add_annotation(x=pos, y=-0.5, yref="y", text=why, showarrow=False,
                               yshift=14, font={"color": "#d62728", "size": 11})
    side = min(900, 260 + 16 * t)
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query", height=side,
                      margin={"l": 60, "r": 20, "t": 70, "b": 60})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def query_frame(tokens: pd.DataFrame, pattern: np.ndarray, query: int) -> pd.DataFrame:
    """`tokens` (a `views.prompt_tokens` frame) with `value`, the attention query `query`
    gives each key (keys after it, or outside its window, are NaN: no colour)."""
    row = pattern[query].astype(float)
    value = np.where(np.arange(len(row)) <= query, row, np.nan)
    return tokens.assign(value=value)
