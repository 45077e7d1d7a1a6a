"""What turns a last-block residual into logits: the final norm, the unembedding and its
soft-capping, found on any transformers causal LM (used by the entropy probe and the lens)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from tokenprobe.placement import execution_device


@dataclass
class Unembedding:
    """What turns a block-L residual into logits: final norm, then weight (V, D) [+ bias],
    then optional soft-capping.

    `weight` and `bias` are the output head's tensors on `device`, where the head computes.
    On a model spread over devices (`tokenprobe.load(device_map=...)`) an offloaded head's
    weights live on CPU or disk between forwards (`meta` on the module): each read of
    `weight` / `bias` brings them to `device` for as long as the caller holds them, and
    `norm(h)` returns the final-normed residual on `device`, so the two always meet.
    """

    final_norm: torch.nn.Module
    head: torch.nn.Module
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
        return cls(norm, head, getattr(config, "final_logit_softcapping", None),
                   config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        """Where the head computes (its accelerate execution device, else its weight's)."""
        return execution_device(self.head)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm of `h` (through the module, so its own offloading applies), on
        `device`."""
        return self.final_norm(h).to(self.device)

    @property
    def weight(self) -> torch.Tensor:
        return self._tensor("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._tensor("bias")

    def _tensor(self, name: str) -> torch.Tensor | None:
        tensor = getattr(self.head, name, None)
        if tensor is None or not tensor.is_meta:
            return tensor
        from accelerate.utils import align_module_device  # offloaded: only with accelerate

        with align_module_device(self.head):  # loads it; the module drops it on exit, we keep it
            return getattr(self.head, name)
