"""Statistics where the model computes attention: a registered transformers attention function.

`tokenprobe` is registered with transformers' `AttentionInterface` (and `sdpa_mask` as its mask
builder, so the model's own causal, padding and sliding-window masks arrive as a boolean
(B, 1, T, S) tensor or None for plain causal). Every attention module of a model switched to it
calls `kernels.attention.attention_with_stats` on its post-RoPE q, k, v: the output replaces
sdpa's, and the per-head statistics go to whoever is observing, a block of queries at a time,
never as a [H, T, T] tensor; the value states and
the output projection go with them, for statistics of the values.

Two context managers switch a model over and always switch it back:
- `observing(model, observe, lengths, ...)`: the runner's, for probes on the `attention` site;
- `zero_tuning(model, gamma, heads)`: ZeroTuning (FeijiangHan/ZeroTuning) on chosen heads,
  usable around any run, forward or `generate`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tokenprobe.kernels.attention import attention_with_stats

NAME = "tokenprobe"


@dataclass
class _Observer:
    observe: Callable[[str, int, dict], None]
    lengths: torch.Tensor
    k_pos: int
    impl: str
    block: int | None


@dataclass
class _State:
    observer: _Observer | None = None
    gamma: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> head -> gamma


_STATE: contextvars.ContextVar[_State] = contextvars.ContextVar("tokenprobe_attention")


def output_weight(module: torch.nn.Module) -> torch.Tensor:
    """The attention output projection as a (D, H * Dh) matrix (Linear `o_proj` / `out_proj` /
    `dense`, or GPT-2's transposed Conv1D `c_proj`)."""
    for name in ("o_proj", "out_proj", "dense"):
        if isinstance(getattr(module, name, None), torch.nn.Linear):
            return getattr(module, name).weight
    if hasattr(module, "c_proj"):  # transformers' Conv1D stores (in, out)
        return module.c_proj.weight.T
    raise ValueError(f"cannot find the output projection of {type(module).__name__}")


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, softcap: float | None = None, **_: object
               ) -> tuple[torch.Tensor, None]:
    state = _STATE.get(None) or _State()
    bsz, heads, t, dh = query.shape
    layer = module.layer_idx
    mask = bool_mask(attention_mask, key.shape[-2])
    gamma = None
    if layer in state.gamma:
        gamma = torch.ones(heads, dtype=torch.float32, device=query.device)
        for head, g in state.gamma[layer].items():
            gamma[head] = g
    observer = state.observer
    full = key.shape[-2] == t  # a whole-sequence forward (no KV cache)
    # The kernel runs without autograd; a caller who needs the output's graph (gradients
    # through a ZeroTuned model) gets the explicit softmax, and the statistics beside it.
    graph = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if not full or (graph and observer is None):  # generation step: the last t positions
        return _explicit(query, key, value, mask, scaling, softcap, gamma), None
    lengths = (observer.lengths.to(query.device) if observer else  # blocks on several GPUs
               torch.full((bsz,), t, device=query.device))
    out, stats = attention_with_stats(
        query, key, value, mask, lengths, scaling=scaling if scaling is not None else dh ** -0.5,
        softcap=softcap, k_pos=observer.k_pos if observer else 0, gamma=gamma,
        block=observer.block if observer else None, impl=observer.impl if observer else "auto")
    if observer is not None:  # the value states and W_O for statistics of the values
        observer.observe("attention", layer, {**stats, "value": value,
                                              "w_o": output_weight(module)})
    if graph:
        out = _explicit(query, key, value, mask, scaling, softcap, gamma)
    return out, None


def bool_mask(attention_mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """The model's attention mask as booleans (True where a query may attend to a key; an
    additive float mask is 0 there), cut to the `n_keys` keys; None stays None (causal)."""
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0
    if mask is not None and mask.shape[-1] != n_keys:
        mask = mask[..., :n_keys]
    return mask


def causal_mask(t: int, s: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(t, s) bool: the last t of s positions as queries, each seeing the keys up to itself."""
    rows = torch.arange(s - t, s, device=device)
    return torch.arange(s, device=device)[None, :] <= rows[:, None]


def _explicit(query, key, value, mask, scaling, softcap, gamma) -> torch.Tensor:
    """Plain softmax attention of queries at the last t of s positions, with ZeroTuning if
    asked: generation steps (a KV cache) and forwards whose output needs autograd's graph."""
    t, s = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1).float()
    v = value.repeat_interleave(groups, 1).float()
    scores = query.float() @ k.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(t, s, query.device)[None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    if gamma is not None:  # finite clamp: gamma = inf puts all mass on key 0, 0 removes it
        scores[..., 0] = scores[..., 0] + torch.log(gamma).view(1, -1, 1).clamp(-1e30, 1e30)
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).to(query.dtype)


AttentionInterface.register(NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def _switched(model: PreTrainedModel, update: Callable[[_State], _State]) -> Iterator[None]:
    previous_impl = model.config._attn_implementation
    token = _STATE.set(update(_STATE.get(None) or _State()))
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous_impl)
        _STATE.reset(token)


def observing(model: PreTrainedModel, observe: Callable[[str, int, dict], None],
              lengths: torch.Tensor, *, k_pos: int = 0, impl: str = "auto",
              block: int | None = None):
    """Route `model`'s attention through tokenprobe and send per-layer stats to `observe`."""
    observer = _Observer(observe, lengths, k_pos, impl, block)
    return _switched(model, lambda s: _State(observer, s.gamma))


def zero_tuning(model: PreTrainedModel, gamma: float,
                heads: Iterable[tuple[int, int]] | None = None):
    """ZeroTuning: scale attention to the first token by `gamma` on `heads` and renormalise rows.

    Args:
        model: a transformers causal LM (e.g. `tokenprobe.load(...).model`).
        gamma: factor on a_{i0} (> 1 strengthens the first-token sink, < 1 weakens it;
            `math.inf` moves all of the head's attention to the first token). At gamma = 0 a
            row whose only key is the first token (the first query's) is left unchanged;
            the authors' code gives NaN there.
        heads: (layer, head) pairs; None means every head of every layer.

    Usable around `tokenprobe.run` (the probes then see the tuned model) and `model.generate`.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    config = model.config
    chosen = (list(heads) if heads is not None else
              [(l, h) for l in range(config.num_hidden_layers)
               for h in range(config.num_attention_heads)])
    for layer, head in chosen:
        if not (0 <= layer < config.num_hidden_layers and 0 <= head < config.num_attention_heads):
            raise ValueError(f"no head ({layer}, {head}) in a model with "
                             f"{config.num_hidden_layers} layers x {config.num_attention_heads} heads")

    def update(state: _State) -> _State:
        gammas = {layer: dict(hs) for layer, hs in state.gamma.items()}
        for layer, head in chosen:
            gammas.setdefault(layer, {})[head] = gamma
        return _State(state.observer, gammas)

    return _switched(model, update)
