"""Entry points: run a forward pass with per-block hooks through HF, TransformerBridge or nnsight.

Each backend calls `observe(site, layer, tensor)` for the residual stream after every decoder
block, inside that framework's own hook mechanism (PyTorch forward hooks, TransformerLens hook
points, an nnsight trace), so the same probe reduces the same tensor whichever way the user
holds the model. Nothing is cached: the tensor is handed to the probe and dropped. A backend
declares the sites it observes (`sites`); `Backend.check` refuses, with one message, the probes
that need another.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe.attention import observing
from tokenprobe.models import LoadedModel, params_fingerprint
from tokenprobe.placement import input_device

Observe = Callable[[str, int, torch.Tensor], None]
SITE_WORDS = {"resid_post": "the residual stream", "attention": "attention statistics"}


class UnsupportedSite(ValueError):
    """A probe needs a site (e.g. `attention`) that the chosen backend does not observe."""


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
        device=str(input_device(loaded.model)))


def as_nnsight(loaded: LoadedModel):
    """An nnsight `TransformersModel` (text generation) over `loaded`'s model.

    It gets a copy of the tokenizer because nnsight sets `padding_side="left"` (and a pad
    token) on the one it is given; `LanguageModel`, the older name, is deprecated.
    """
    from nnsight import TransformersModel

    return TransformersModel(loaded.model, task="text-generation",
                             tokenizer=copy.copy(loaded.tokenizer))


@dataclass(frozen=True, repr=False)
class Backend(abc.ABC):
    """A model held through one of the supported frameworks, behind one `forward` call.

    Class attributes: `name` (the CLI's --backend choice), `kind` (run.json's "backend"),
    `sites` (what `forward` observes) and `accepts` (what the user passes, for messages).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    sites: ClassVar[frozenset[str]]
    accepts: ClassVar[str]

    handle: Any  # what the user passed
    hf_model: PreTrainedModel  # the underlying transformers model (for config and metadata)
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    fingerprint: str

    @property
    def n_layers(self) -> int:
        return self.hf_model.config.num_hidden_layers

    @property
    def context_length(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        """Where a batch's input ids and mask go: where the input embedding computes (not
        `next(parameters())`, which is `meta` for an offloaded embedding of a model spread
        over devices with `tokenprobe.load(device_map=...)`)."""
        return input_device(self.hf_model)

    @staticmethod
    @abc.abstractmethod
    def over(loaded: LoadedModel) -> Any:
        """What to pass to `tokenprobe.run` to go through this backend with `loaded`."""

    @classmethod
    def check(cls, needs: Mapping[str, Iterable[str]],
              known: Mapping[str, Iterable[str]] | None = None) -> None:
        """Raise `UnsupportedSite` for the probes of `needs` (name -> sites it hooks) that hook
        a site this backend lacks; works on the class, so before a model loads. `known` (the
        same for every registered probe) names the alternatives, else those of `needs` do."""
        missing = {p: set(s) - cls.sites for p, s in needs.items() if not set(s) <= cls.sites}
        if not missing:
            return
        lacking = sorted(set().union(*missing.values()))
        others = [b for b in BACKENDS.values() if set(lacking) <= b.sites]
        subject = (f"probe {next(iter(missing))} needs" if len(missing) == 1
                   else f"probes {', '.join(missing)} need")
        what = " and ".join(f"{SITE_WORDS.get(s, s)} (site {s})" for s in lacking)
        where = (f"which only the {' and '.join(b.name for b in others)} "
                 f"backend{'s provide' if len(others) > 1 else ' provides'}")
        fix = " or ".join(f"pass {b.accepts} (--backend {b.name})" for b in others)
        runnable = [p for p, s in (known or needs).items() if set(s) <= cls.sites]
        alternative = (f"choose probes among those the {cls.name} backend supports: "
                       f"{', '.join(runnable)}" if runnable else
                       f"choose probes that need only {', '.join(sorted(cls.sites))}")
        raise UnsupportedSite(f"{subject} {what}, {where}: {fix}, or {alternative}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                observe: Observe, attention: dict | None = None) -> None:
        """Run one batch, calling `observe` inside the framework's hooks.

        `attention` (k_pos, impl, block: options of `tokenprobe.attention.observing`) observes
        the `attention` site too; a backend without that site raises `UnsupportedSite`.
        """
        if attention is not None:
            self.check({"(attention options)": {"attention"}})
        with torch.inference_mode():
            self._forward(input_ids, attention_mask, observe, attention)

    @abc.abstractmethod
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 observe: Observe, attention: dict | None) -> None:
        """The framework's own forward with hooks (under inference mode, sites checked)."""


class HFBackend(Backend):
    """A transformers model: PyTorch forward hooks, and attention through tokenprobe's
    attention function (the only backend with the `attention` site)."""

    name = "hf"
    kind = "hf"
    sites = frozenset({"resid_post", "attention"})
    accepts = "the tokenprobe.load() result or the transformers model"

    @staticmethod
    def over(loaded: LoadedModel) -> LoadedModel:
        return loaded

    def _forward(self, input_ids, attention_mask, observe, attention) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(block_hooks(self.hf_model, observe))
            if attention is not None:
                stack.enter_context(observing(
                    self.hf_model, observe, attention_mask.sum(-1), **attention))
            self.hf_model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False, logits_to_keep=1)


class BridgeBackend(Backend):
    """A TransformerLens `TransformerBridge`: hooks on `blocks.{layer}.hook_out`."""

    name = "bridge"
    kind = "transformer_bridge"
    sites = frozenset({"resid_post"})
    accepts = "a TransformerLens TransformerBridge"
    over = staticmethod(as_bridge)

    def _forward(self, input_ids, attention_mask, observe, attention) -> None:
        hooks = [(f"blocks.{layer}.hook_out",
                  lambda t, hook, layer=layer: observe("resid_post", layer, t))
                 for layer in range(self.n_layers)]
        with self.handle.hooks(fwd_hooks=hooks):
            self.handle(input_ids, attention_mask=attention_mask, return_type=None)


class NNsightBackend(Backend):
    """An nnsight `TransformersModel` (or its deprecated subclass `LanguageModel`): reads each
    block's output inside one trace."""

    name = "nnsight"
    kind = "nnsight"
    sites = frozenset({"resid_post"})
    accepts = "an nnsight TransformersModel"
    over = staticmethod(as_nnsight)

    def _forward(self, input_ids, attention_mask, observe, attention) -> None:
        envoy = self.handle
        for part in decoder_layers_path(self.hf_model).split("."):
            envoy = getattr(envoy, part)
        with self.handle.trace({"input_ids": input_ids, "attention_mask": attention_mask},
                               use_cache=False, logits_to_keep=1):
            for layer in range(self.n_layers):
                observe("resid_post", layer, _first(envoy[layer].output))


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (HFBackend, BridgeBackend, NNsightBackend)}


def _instance_of(model: Any, module: str, cls: str) -> bool:
    """`isinstance(model, module.cls)`, importing `module` only when one of the classes of
    `model` comes from its package (so plain use never imports nnsight or TransformerLens)."""
    package = module.partition(".")[0]
    return (any(c.__module__.partition(".")[0] == package for c in type(model).__mro__)
            and isinstance(model, getattr(importlib.import_module(module), cls)))


def resolve(model: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> Backend:
    """The backend for what the user holds: a `LoadedModel` or transformers model (hf), a
    `TransformerBridge` (bridge) or an nnsight `TransformersModel`/`LanguageModel` (nnsight).
    `tokenizer` overrides the model's (required for a bare transformers model).

    Raises:
        ValueError: a transformers model without `tokenizer`.
        TypeError: anything else, naming what is accepted.
    """
    if isinstance(model, LoadedModel):
        return HFBackend(model.model, model.model, tokenizer or model.tokenizer, model.name,
                         model.fingerprint)
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("a Hugging Face model needs its tokenizer: run(model, prompts, "
                             "tokenizer=...)")
        return HFBackend(model, model, tokenizer, model.name_or_path or type(model).__name__,
                         params_fingerprint(model))
    if _instance_of(model, "transformer_lens.model_bridge", "TransformerBridge"):
        cls, hf = BridgeBackend, model.original_model
    elif _instance_of(model, "nnsight", "TransformersModel"):  # LanguageModel subclasses it
        model.dispatch()  # real weights for a model built lazily from a repo id (no-op if loaded)
        cls, hf = NNsightBackend, model._module
    else:
        raise TypeError(f"unsupported model type {type(model).__module__}."
                        f"{type(model).__qualname__}: pass a tokenprobe.load() result, a "
                        "transformers PreTrainedModel, a TransformerLens TransformerBridge or an "
                        "nnsight TransformersModel (or LanguageModel)")
    return cls(model, hf, tokenizer or model.tokenizer, hf.name_or_path or type(model).__name__,
               params_fingerprint(hf))
