"""Active vs dormant attention heads: the change in mean next-token loss when one head is ablated.

Definition (README, "Measures"; Guo et al., "Active-Dormant Attention Heads",
GuoTianYu2000/Active-Dormant-Attention): ablate a head and measure the change in mean next-token
loss on a prompt set; the head is dormant on that domain when the change is below a threshold
and active otherwise. The paper gives no threshold; `HeadAblationConfig.threshold` is ours.
The effect size (`delta_loss`) is always reported next to the label.

Two ablations:
- "zero": the head's Dh-slice of the attention output is set to zero before the output
  projection (a forward pre-hook on `o_proj`), i.e. the head adds nothing to the residual;
- "sink": all of the head's attention moves to the first token (ZeroTuning with gamma = inf,
  `tokenprobe.attention.zero_tuning`), so its output is the value of position 0 at every query.

Built-in prompt domains live in `tokenprobe/data/domains/<name>.txt`, one prompt per line. A
prompt cannot span lines, so the two characters backslash-n inside a line stand for a newline
and are decoded to one on load (the code domain relies on this); a literal backslash followed by
`n` therefore cannot be written in a domain file.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenprobe.attention import zero_tuning
from tokenprobe.backends import decoder_layers_path
from tokenprobe.models import LoadedModel
from tokenprobe.tokens import encode_prompts, pad_batch

METHODS = ("zero", "sink")
BUILTIN_DOMAINS = ("prose", "code")
COLUMNS = ["domain", "layer", "head", "method", "base_loss", "ablated_loss", "delta_loss", "label"]
IGNORE = -100  # cross-entropy label of padding and of the unpredicted first token

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), each (B, T)


@dataclass(frozen=True)
class HeadAblationConfig:
    """Settings of the active/dormant head study (Guo et al., "Active-Dormant Attention Heads").

    Attributes:
        method: "zero" (zero the head's output before the output projection) or "sink"
            (move all of the head's attention to the first token, ZeroTuning gamma = inf).
        threshold: a head is active on a domain when ablating it raises the mean next-token
            loss by at least this many nats, dormant otherwise. The paper gives none. 0.01 nats
            is a 1% rise in perplexity (exp(0.01) = 1.010), a fraction of a percent of the
            2-4 nats a small LM scores on short prompts, and about three orders of magnitude
            above the float32 differences between attention implementations (~1e-5).
        batch_size: prompts per forward pass (right-padded; padding is never scored).
    """

    method: str = "zero"
    threshold: float = 0.01
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number of nats, got {self.threshold}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def read_domain(path: str | os.PathLike) -> list[str]:
    """Prompts of a domain file: one per non-blank line, backslash-n decoded to a newline."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def load_domains(names: Iterable[str] = BUILTIN_DOMAINS) -> dict[str, list[str]]:
    """The built-in prompt domains by name (default: "prose" and "code", 14 prompts each)."""
    root = importlib.resources.files("tokenprobe") / "data" / "domains"
    out = {}
    for name in names:
        if name not in BUILTIN_DOMAINS:
            raise ValueError(f"no built-in domain {name!r}; built-ins: {', '.join(BUILTIN_DOMAINS)}")
        with importlib.resources.as_file(root / f"{name}.txt") as path:
            out[name] = read_domain(path)
    return out


def attention_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The `self_attn` module of decoder block `layer`."""
    blocks = model.get_submodule(decoder_layers_path(model))
    return blocks[layer].self_attn


def _output_projection(attn: torch.nn.Module) -> torch.nn.Module:
    for name in ("o_proj", "out_proj", "dense", "c_proj"):
        module = getattr(attn, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"cannot find the output projection of {type(attn).__name__}")


def _check_heads(model: torch.nn.Module, heads: list[tuple[int, int]]) -> None:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"no head ({layer}, {head}) in a model with {n_layers} layers x "
                             f"{n_heads} heads")


@contextlib.contextmanager
def zero_ablation(model: torch.nn.Module, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Zero the outputs of `heads` ((layer, head) pairs) before each layer's output projection.

    A forward pre-hook on the attention module's output projection (`o_proj`) replaces its
    (B, T, H * Dh) input by a copy whose Dh-slices of the chosen heads are zero. The hooks are
    always removed on exit, also when the body raises.
    """
    chosen = list(heads)
    _check_heads(model, chosen)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in chosen:
        by_layer[layer].append(head)
    n_heads = model.config.num_attention_heads

    def hook_for(zeroed: list[int]):
        def pre_hook(_module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            out = x.unflatten(-1, (n_heads, -1)).clone()  # (B, T, H, Dh)
            out[..., zeroed, :] = 0
            return (out.flatten(-2), *args[1:])
        return pre_hook

    handles = []
    try:
        for layer, zeroed in by_layer.items():
            proj = _output_projection(attention_module(model, layer))
            handles.append(proj.register_forward_pre_hook(hook_for(sorted(set(zeroed)))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablation(model: torch.nn.Module, heads: Iterable[tuple[int, int]], method: str):
    """Context manager ablating `heads` by `method` ("zero" or "sink"); nothing else changes.

    With no heads, "sink" still routes attention through tokenprobe's attention function (the
    path its ablated runs take), so a baseline under it differs from the ablated runs only by
    the ablation.
    """
    if method == "zero":
        return zero_ablation(model, heads)
    if method == "sink":
        return zero_tuning(model, math.inf, list(heads))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def encode_batches(loaded: LoadedModel, prompts: list[str], *, batch_size: int) -> list[Batch]:
    """Tokenise `prompts` (the tokenizer's default special tokens) into right-padded batches."""
    if not prompts:
        raise ValueError("no prompts given")
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = encode_prompts(tokenizer, prompts, truncate=False,
                             context_length=getattr(model.config, "max_position_embeddings", None))
    rows = [ids for ids, _ in encoded]
    if all(len(r) < 2 for r in rows):
        raise ValueError("every prompt has a single token: nothing to predict")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together
    return [pad_batch([rows[i] for i in order[a:a + batch_size]], pad_id, device)
            for a in range(0, len(order), batch_size)]


def batches_loss(model: torch.nn.Module, batches: list[Batch]) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats, float64) and number of predicted tokens."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (B, T-1)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=IGNORE, reduction="sum")
            total += loss.double().item()
            count += int((labels != IGNORE).sum())
    return total, count


def mean_next_token_loss(loaded: LoadedModel, prompts: list[str], *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of all prompts.

    Tokens are pooled: a prompt weighs by its number of predicted tokens (its length - 1).
    Padding is never scored. Call it inside `ablation(...)` for an ablated model.
    """
    total, count = batches_loss(loaded.model, encode_batches(loaded, prompts, batch_size=batch_size))
    return total / count


def head_effects(loaded: LoadedModel, domains: dict[str, list[str]],
                 config: HeadAblationConfig = HeadAblationConfig(), *,
                 layers: Iterable[int] | None = None, progress: bool = True) -> pd.DataFrame:
    """Ablate every head (one at a time) and report the change in mean next-token loss per domain.

    Args:
        loaded: a `tokenprobe.load()` result.
        domains: domain name -> prompts (e.g. `load_domains()`).
        config: ablation method, active/dormant threshold and batch size.
        layers: 0-based layers whose heads are ablated (default: all).
        progress: show a tqdm bar over heads.

    Returns:
        One row per (domain, layer, head), columns: domain; layer, head (0-based); method;
        base_loss (mean next-token loss of the unablated model, nats; for "sink" computed
        through tokenprobe's attention function like the ablated runs); ablated_loss (nats);
        delta_loss = ablated_loss - base_loss (nats); label "active" if delta_loss >= threshold
        else "dormant". `attrs` holds the threshold, the method and the token counts.
    """
    model = loaded.model
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    chosen = list(range(n_layers)) if layers is None else sorted(set(layers))
    heads = [(layer, head) for layer in chosen for head in range(n_heads)]
    _check_heads(model, heads)
    if not domains:
        raise ValueError("no domains given")
    batches = {name: encode_batches(loaded, prompts, batch_size=config.batch_size)
               for name, prompts in domains.items()}
    base, counts = {}, {}
    with ablation(model, [], config.method):
        for name, b in batches.items():
            total, counts[name] = batches_loss(model, b)
            base[name] = total / counts[name]
    rows = []
    for layer, head in tqdm(heads, desc=f"heads ({config.method})", unit="head",
                            disable=not progress):
        with ablation(model, [(layer, head)], config.method):
            for name, b in batches.items():
                ablated = batches_loss(model, b)[0] / counts[name]
                rows.append((name, layer, head, config.method, base[name], ablated,
                             ablated - base[name]))
    frame = pd.DataFrame(rows, columns=COLUMNS[:-1])
    frame["label"] = frame.delta_loss.ge(config.threshold).map({True: "active", False: "dormant"})
    frame = frame.sort_values(["domain", "layer", "head"], kind="stable", ignore_index=True)
    frame.attrs.update(threshold=config.threshold, method=config.method, n_tokens=counts)
    return frame[COLUMNS]
