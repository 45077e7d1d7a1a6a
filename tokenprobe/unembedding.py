"""What turns a last-block residual into logits: the final norm, the unembedding and its
soft-capping, found on any transformers causal LM (used by the entropy probe and the lens)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass
class Unembedding:
    """What turns a block-L residual into logits: final norm, then weight (V, D) [+ bias],
    then optional soft-capping."""

    norm: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    n_layers: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Unembedding":
        config = model.config
        for attr in ("logit_scale", "logits_scaling"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"{type(model).__name__} scales its logits "
                                          f"({attr}); the entropy probe does not support that yet")
        decoder = model.get_decoder()
        norm = next((getattr(decoder, n) for n in ("norm", "final_layernorm", "ln_f")
                     if isinstance(getattr(decoder, n, None), torch.nn.Module)), None)
        head = model.get_output_embeddings()
        if norm is None or head is None:
            raise NotImplementedError(f"cannot find the final norm and unembedding of "
                                      f"{type(model).__name__}")
        return cls(norm, head.weight, getattr(head, "bias", None),
                   getattr(config, "final_logit_softcapping", None), config.num_hidden_layers)
