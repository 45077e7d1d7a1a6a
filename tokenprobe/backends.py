"""Entry points: run a forward pass with per-block hooks through HF, TransformerBridge or nnsight.

Each backend calls `observe(site, layer, tensor)` for the residual stream after every decoder
block, inside that framework's own hook mechanism (PyTorch forward hooks, TransformerLens hook
points, an nnsight trace), so the same probe reduces the same tensor whichever way the user
holds the model. Nothing is cached: the tensor is handed to the probe and dropped.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe.attention import observing
from tokenprobe.models import LoadedModel, params_fingerprint

Observe = Callable[[str, int, torch.Tensor], None]


def decoder_layers_path(model: PreTrainedModel) -> str:
    """Dotted path of the decoder block list (e.g. `model.layers`) inside an HF causal LM."""
    n = model.config.num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and path:
            return path
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def block_hooks(model: PreTrainedModel, observe: Observe) -> Iterator[None]:
    """Forward hooks on every decoder block of `model`; always removed on exit."""
    layers = model.get_submodule(decoder_layers_path(model))
    handles = [
        block.register_forward_hook(
            lambda _m, _i, out, layer=layer: observe("resid_post", layer, _first(out)))
        for layer, block in enumerate(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Backend:
    """A model held through one of the supported frameworks, behind one `forward` call."""

    kind: str  # "hf" | "transformer_bridge" | "nnsight"
    handle: Any  # what the user passed
    hf_model: PreTrainedModel  # the underlying transformers model (for config and metadata)
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str

    @property
    def n_layers(self) -> int:
        return self.hf_model.config.num_hidden_layers

    @property
    def context_length(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                observe: Observe, attention: dict | None = None) -> None:
        """Run one batch, calling `observe` inside the framework's hooks.

        `attention` (k_pos, impl, block) routes attention through tokenprobe's attention
        function so that the `attention` site is observed too; transformers entry point only.
        """
        if attention is not None and self.kind != "hf":
            raise ValueError(
                "probes on the attention site (sinks) run through the transformers entry point: "
                "pass the tokenprobe.load() result or the HF model, not a "
                f"{type(self.handle).__name__}")
        with torch.inference_mode():
            if self.kind == "hf":
                with contextlib.ExitStack() as stack:
                    stack.enter_context(block_hooks(self.hf_model, observe))
                    if attention is not None:
                        stack.enter_context(observing(
                            self.hf_model, observe, attention_mask.sum(-1), **attention))
                    self.hf_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False, logits_to_keep=1)
            elif self.kind == "transformer_bridge":
                hooks = [(f"blocks.{layer}.hook_out",
                          lambda t, hook, layer=layer: observe("resid_post", layer, t))
                         for layer in range(self.n_layers)]
                with self.handle.hooks(fwd_hooks=hooks):
                    self.handle(input_ids, attention_mask=attention_mask, return_type=None)
            else:
                self._nnsight_forward(input_ids, attention_mask, observe)

    def _nnsight_forward(self, input_ids, attention_mask, observe: Observe) -> None:
        envoy = self.handle
        for part in decoder_layers_path(self.hf_model).split("."):
            envoy = getattr(envoy, part)
        with self.handle.trace({"input_ids": input_ids, "attention_mask": attention_mask}):
            for layer in range(self.n_layers):
                observe("resid_post", layer, _first(envoy[layer].output))


def resolve(model: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> Backend:
    """Wrap whatever the user holds: `LoadedModel`, HF model, `TransformerBridge` or nnsight model."""
    if isinstance(model, LoadedModel):
        return Backend("hf", model.model, model.model, tokenizer or model.tokenizer,
                       model.name, model.fingerprint)
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("a Hugging Face model needs its tokenizer: run(model, prompts, "
                             "tokenizer=...)")
        return Backend("hf", model, model, tokenizer, model.name_or_path or type(model).__name__,
                       params_fingerprint(model))
    kind = type(model).__name__
    if kind == "TransformerBridge":
        hf = model.original_model
        return Backend("transformer_bridge", model, hf, tokenizer or model.tokenizer,
                       hf.name_or_path or kind, params_fingerprint(hf))
    if kind == "LanguageModel" and type(model).__module__.startswith("nnsight"):
        hf = model._module
        return Backend("nnsight", model, hf, tokenizer or model.tokenizer,
                       hf.name_or_path or kind, params_fingerprint(hf))
    raise TypeError(f"unsupported model type {type(model).__module__}.{kind}: pass a "
                    "tokenprobe.load() result, a transformers PreTrainedModel, a TransformerLens "
                    "TransformerBridge or an nnsight LanguageModel")


def as_bridge(loaded: LoadedModel):
    """A TransformerLens `TransformerBridge` over `loaded`.

    Booting switches `loaded.model` to eager attention (TransformerLens needs it for its
    attention hooks). TransformerLens also gives the bridge a copy of the tokenizer that
    prepends BOS; pass `tokenizer=loaded.tokenizer` to `tokenprobe.run` to keep the model's own
    tokenisation (no BOS for SmolLM2, `<bos>` for Gemma 3), as the CLI does.
    """
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        loaded.tokenizer.name_or_path, hf_model=loaded.model, tokenizer=loaded.tokenizer,
        device=str(next(loaded.model.parameters()).device))


def as_nnsight(loaded: LoadedModel):
    """An nnsight `LanguageModel` over `loaded`'s model and tokenizer."""
    from nnsight import LanguageModel

    return LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
