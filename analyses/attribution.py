"""Attribution by ablation: how much each input token matters to a target's log-probability.

Definition (README, "Measures"): per input token, the change in the target's
log-prob when the token is ablated, `delta_logprob = ablated - original` (nats; negative when
the token supported the target). Two ablations:

- "removal": the token is deleted from the input and the shortened sequence is run afresh
  (later tokens move one position left, so their positional encodings change too);
- "knockout": attention knockout (Geva, Bastings, Filippova, Globerson, "Dissecting Recall of
  Factual Associations in Auto-Regressive Language Models", 2023; "All for One"): in the chosen
  layers, every head is barred from reading the token's key, i.e. the attention edges
  j -> i are cut for queries i > j (`to="later"`) or only for the queries that predict the
  target (`to="target"`, Geva et al.'s edges into the last position). The token still
  attends to itself and to earlier tokens, so no attention row is ever empty; layers outside
  the chosen ones see the model's normal mask.

Target: with a continuation c_1..c_m, its total log-prob sum_t log p(c_t | prompt, c_<t)
under teacher forcing; without one, log p(y | prompt) of the unablated model's greedy next
token y (the same y is then scored under every ablation).

Knockout is a forward pre-hook on the chosen layers' attention modules that replaces the
`attention_mask` keyword by the model's causal mask with the knocked-out keys removed, one
(T, T) pattern per batch row, so one forward scores a batch of positions. It works with the
eager (additive float mask), sdpa and tokenprobe (boolean mask) attention implementations.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd
import torch

from tokenprobe.backends import decoder_layers_path
from tokenprobe.models import LoadedModel
from tokenprobe.store import Run, RunWriter, check_target, prompt_tables
from tokenprobe.tables import Column, Table, conform, declare
from tokenprobe.tokens import token_text

C = Column
declare("attribution", {"attributions": Table(
    "prompt x position x method x layer set (tokenprobe attribute; the target is in "
    'meta["summary"]["attribution"])', ("prompt_id", "pos", "method", "layer_range"), {
        "prompt_id": C("int64", "key"),
        "pos": C("int64", "key: the ablated input position (0-based)"),
        "token_id": C("int64", "the ablated token's id"),
        "token": C("string", "the ablated token"),
        "method": C("string", "removal (token deleted, sequence re-run) / knockout (its key "
                              "masked for all heads of the layers in layer_range; Geva et al.)"),
        "layer_range": C("string", "knocked-out layers, 0-based, as '0-8' or '0-2,5'; '' for "
                                   "removal"),
        "base_logprob": C("float64", "the target's total log-prob without ablation (nats)"),
        "ablated_logprob": C("float64", "the same under the ablation (nats)"),
        "delta_logprob": C("float64", "ablated - base (nats; negative: the token supported "
                                      "the target)")})})
del C

METHODS = ("removal", "knockout")
KNOCKOUT_TO = ("later", "target")
COLUMNS = ["prompt_id", "pos", "token_id", "token", "method", "layer_range", "base_logprob",
           "ablated_logprob", "delta_logprob"]


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of attribution by ablation (README, "Measures"; Geva et al. 2023 for knockout).

    Attributes:
        methods: which ablations to run, of "removal" and "knockout".
        layers: 0-based layers whose attention is knocked out (None: all layers).
        window: if set, knock out sliding windows of this many consecutive layers instead,
            one window centred on each layer (clipped at the ends), as Geva et al. do (k = 9
            for GPT-J); each window is a `layer_range` of its own.
        to: "later" cuts the token's key from every later query; "target" only from the
            queries that predict the target tokens.
        batch_size: ablated sequences per forward pass.
    """

    methods: tuple[str, ...] = METHODS
    layers: tuple[int, ...] | None = None
    window: int | None = None
    to: str = "later"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if self.to not in KNOCKOUT_TO:
            raise ValueError(f"to must be one of {KNOCKOUT_TO}, got {self.to!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def layer_range(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the `layer_range` column; '' for no layers)."""
    chosen, parts = sorted(set(layers)), []
    for layer in chosen:
        if parts and parts[-1][1] == layer - 1:
            parts[-1][1] = layer
        else:
            parts.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def knockout_mask(base: torch.Tensor, knocked: torch.Tensor, queries: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """A boolean attention mask with keys of each batch row cut from the later queries.

    Args:
        base: (B or 1, 1, T, S) boolean mask, True where attention is allowed.
        knocked: (B,) long key position per row, or -1 for no knockout in that row; or
            (B, S) bool, True at every key cut in that row (a unit of several tokens).
        queries: (T,) boolean, the queries whose edges are cut (None: all of them); a query
            never loses its own key.

    Returns:
        (B, 1, T, S) boolean mask.
    """
    bsz, (t, s) = knocked.shape[0], base.shape[-2:]
    keys = torch.arange(s, device=base.device)
    rows = torch.arange(s - t, s, device=base.device)  # absolute query positions
    hit = knocked[:, None, :] if knocked.dtype == torch.bool else keys == knocked[:, None, None]
    cut = hit & (rows[:, None] != keys)  # (B, T, S)
    if queries is not None:
        cut &= queries.to(base.device)[None, :, None]
    return base.expand(bsz, 1, t, s) & ~cut[:, None]


def target_queries(n_prompt: int, t: int) -> torch.Tensor:
    """(T,) bool: the queries that predict the target's tokens (positions n_prompt - 1 ..
    T - 2 of a prompt of n_prompt tokens followed by the target), for knockout `to="target"`."""
    queries = torch.zeros(t, dtype=torch.bool)
    queries[n_prompt - 1:t - 1] = True
    return queries


@contextlib.contextmanager
def attention_knockout(model: torch.nn.Module, layers: Iterable[int], knocked: torch.Tensor,
                       queries: torch.Tensor | None = None) -> Iterator[None]:
    """Knock out key `knocked[b]` (or the keys True in a (B, S) bool `knocked[b]`) of batch row
    b in `layers` (all heads) during the body.

    A forward pre-hook (with kwargs) on each chosen layer's attention module replaces its
    `attention_mask` by `knockout_mask` of the model's own mask (a plain causal one when the
    model passes None): boolean for sdpa / tokenprobe attention, additive float for eager.
    For whole-sequence forwards only (no KV cache). Hooks are always removed on exit.
    """
    blocks = model.get_submodule(decoder_layers_path(model))
    impl = model.config._attn_implementation
    if impl is not None and "flash" in impl:
        raise ValueError(f"attention knockout needs an explicit mask; {impl} takes none")

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        t = hidden.shape[1]
        if mask is None:  # sdpa's causal shortcut: the mask is the plain causal one
            allowed = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()[None, None]
            additive = impl == "eager"
        else:
            additive = mask.dtype != torch.bool
            allowed = mask == 0 if additive else mask
        new = knockout_mask(allowed, knocked.to(hidden.device), queries)
        if additive:
            dtype = mask.dtype if mask is not None else hidden.dtype
            new = torch.zeros(new.shape, dtype=dtype, device=new.device).masked_fill(
                ~new, torch.finfo(dtype).min)
        return args, {**kwargs, "attention_mask": new}

    handles = []
    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].self_attn.register_forward_pre_hook(
                pre_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Total log-prob of `target` under teacher forcing.

    Args:
        logits: (B, m, V) logits at the m positions that predict the target tokens.
        target: (m,) target token ids.

    Returns:
        (B,) float64 sums of log softmax(logits)[target].
    """
    logp = torch.log_softmax(logits.double(), -1)  # (B, m, V)
    return logp.gather(-1, target.view(1, -1, 1).expand(logp.shape[0], -1, 1)).sum((1, 2))


def _score(model: torch.nn.Module, ids: torch.Tensor, m: int) -> torch.Tensor:
    """(B,) total log-prob of the last m tokens of each (B, T) row, predicted by the m before."""
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=m + 1).logits[:, :-1]  # (B, m, V)
    return target_logprob(logits, ids[0, -m:])


def _batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for a in range(0, len(items), size):
        yield items[a:a + size]


def _layer_sets(config: AttributionConfig, n_layers: int) -> list[list[int]]:
    layers = list(range(n_layers)) if config.layers is None else sorted(set(config.layers))
    if any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers {layers} outside 0..{n_layers - 1}")
    if config.window is None:
        return [layers]
    half = config.window // 2
    return [[x for x in range(layer - half, layer - half + config.window) if 0 <= x < n_layers]
            for layer in layers]


@torch.inference_mode()
def attribute(loaded: LoadedModel, prompt: str | Sequence[int], continuation: str | Sequence[int]
              | None = None, config: AttributionConfig = AttributionConfig(), *,
              positions: Sequence[int] | None = None, prompt_id: int = 0) -> pd.DataFrame:
    """Attribution by ablation of one prompt's tokens to a target (see the module docstring).

    Args:
        loaded: a `tokenprobe.load()` result.
        prompt: text (the tokenizer's default special tokens) or token ids.
        continuation: the target's text (tokenised without special tokens) or ids; None for
            the greedy next token.
        config: methods, knockout layers and batch size.
        positions: input positions to ablate (default: every prompt position). Knockout also
            accepts continuation positions (their keys feed the later target tokens);
            removal only prompt positions.
        prompt_id: the `prompt_id` written in the table.

    Returns:
        One row per (pos, method, layer_range), columns `COLUMNS`: prompt_id; pos (0-based
        input position); token_id, token; method ("removal" / "knockout"); layer_range
        (knocked-out layers as '0-2,5', '' for removal); base_logprob, ablated_logprob
        (target log-prob in nats, float64); delta_logprob = ablated - base. `attrs` holds
        the target ids and text.
    """
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    p_ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else [int(i) for i in prompt]
    if continuation is None:
        logits = model(input_ids=torch.tensor([p_ids], device=device), logits_to_keep=1).logits
        c_ids = [int(logits[0, -1].argmax())]
    elif isinstance(continuation, str):
        c_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    else:
        c_ids = [int(i) for i in continuation]
    if not p_ids or not c_ids:
        raise ValueError("the prompt and the target need at least one token each")
    ids = torch.tensor([p_ids + c_ids], device=device)  # (1, T)
    n_p, m, t = len(p_ids), len(c_ids), len(p_ids) + len(c_ids)
    chosen = list(range(n_p)) if positions is None else sorted(set(positions))
    if any(not 0 <= j < t for j in chosen):
        raise ValueError(f"positions must lie in 0..{t - 1}")
    base = float(_score(model, ids, m)[0])
    rows = []

    def emit(method: str, layers: str, pos: Sequence[int], scores: torch.Tensor) -> None:
        for j, s in zip(pos, scores.tolist()):
            token = int(ids[0, j])
            rows.append((prompt_id, j, token, token_text(tok, token), method, layers, base, s,
                         s - base))

    if "removal" in config.methods:
        if any(j >= n_p for j in chosen):
            raise ValueError(f"removal ablates prompt positions only (0..{n_p - 1})")
        if n_p < 2:
            raise ValueError("removal needs a prompt of 2+ tokens: removing the only one leaves "
                             "nothing to predict the target from")
        for pos in _batches(chosen, config.batch_size):
            keep = torch.ones(len(pos), t, dtype=torch.bool, device=device)
            keep[torch.arange(len(pos)), torch.tensor(pos)] = False
            short = ids.expand(len(pos), t)[keep].view(len(pos), t - 1)  # (b, T - 1)
            emit("removal", "", pos, _score(model, short, m))
    if "knockout" in config.methods:
        queries = target_queries(n_p, t) if config.to == "target" else None
        for layers in _layer_sets(config, model.config.num_hidden_layers):
            for pos in _batches(chosen, config.batch_size):
                with attention_knockout(model, layers, torch.tensor(pos), queries):
                    scores = _score(model, ids.expand(len(pos), t), m)
                emit("knockout", layer_range(layers), pos, scores)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs.update(target_ids=c_ids, target=tok.decode(c_ids))
    return frame


def attributions(loaded: LoadedModel, prompts: Sequence[str],
                 continuations: Sequence[str | None] | None = None,
                 config: AttributionConfig = AttributionConfig()) -> pd.DataFrame:
    """The `attributions` table of several prompts (prompt_id = index); see `attribute`."""
    targets = list(continuations) if continuations is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} continuations")
    frames = [attribute(loaded, p, c, config, prompt_id=i)
              for i, (p, c) in enumerate(zip(prompts, targets))]
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs.update(targets=[f.attrs["target"] for f in frames])
    return frame


def attribution_run(loaded: LoadedModel, prompts: Sequence[str],
                    targets: Sequence[str | None] | None = None,
                    config: AttributionConfig = AttributionConfig(), *,
                    layer_sets: Sequence[Sequence[int]] | None = None,
                    progress: bool = False, out: str | os.PathLike | None = None,
                    overwrite: bool = False) -> Run:
    """Attribution of several prompts as a run: tables `prompts`, `tokens`, `attributions`.

    Args:
        loaded: a `tokenprobe.load()` result.
        prompts: prompt texts (prompt_id = index).
        targets: one target text per prompt (None entries, or None: the greedy next token).
        config: methods, knockout queries, window and batch size.
        layer_sets: knockout layer sets, each its own `layer_range` (e.g. [[0..8], [9..17]]);
            None: `config.layers` (with `config.window`, windows centred on those layers).
        progress: a tqdm bar over (prompt, layer set) passes.
        out, overwrite: save the run there (see `tokenprobe.store.RunWriter`); None keeps it
            in memory.

    Returns:
        The run; `tokens` holds each prompt's tokens followed by its target's, and
        `meta["summary"]["attribution"]` per prompt: target, target_ids, prompt_tokens
        (target rows start there) and base_logprob (nats).
    """
    from tqdm.auto import tqdm

    targets = list(targets) if targets is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if layer_sets is not None and config.window is not None:
        raise ValueError("give layer_sets or a window, not both")
    sets = [config.layers] if layer_sets is None else [tuple(s) for s in layer_sets]
    if out is not None:
        check_target(Path(out), overwrite=overwrite)  # a taken --out fails before the work
    tok, frames, rows, summary = loaded.tokenizer, [], [], []
    with tqdm(total=len(prompts) * len(sets), desc="attribution", unit="pass",
              disable=not progress) as bar:
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            parts = []
            for k, layers in enumerate(sets):
                methods = tuple(m for m in config.methods if m == "knockout" or k == 0)
                if methods:
                    parts.append(attribute(loaded, prompt, target,
                                           replace(config, methods=methods, layers=layers),
                                           prompt_id=i))
                bar.update(1)
            frames += parts
            p_ids, c_ids = tok(prompt)["input_ids"], parts[0].attrs["target_ids"]
            ids = list(p_ids) + list(c_ids)
            rows.append((i, prompt, ids, False))
            summary.append({"prompt_id": i, "target": parts[0].attrs["target"],
                            "target_ids": list(c_ids), "prompt_tokens": len(p_ids),
                            "base_logprob": float(parts[0].base_logprob.iat[0])})
    writer = RunWriter(out, model=loaded.model, name=loaded.name, fingerprint=loaded.fingerprint,
                       settings={"analysis": "attribution", "config": {
                           **asdict(config), "layer_sets": [list(s) if s is not None else None
                                                            for s in sets]}},
                       overwrite=overwrite)
    writer.write(0, {**prompt_tables(tok, rows),
                     "attributions": conform("attributions", pd.concat(frames, ignore_index=True))})
    return writer.finish(lambda tables: (tables, {"summary": {"attribution": summary}}))
