"""The Gumbel-max samplers of counterfactual.py (full, top-p, top-k) and its replacement draw.

They follow Chatzi et al.'s code (github.com/Networks-Learning/counterfactual-llms,
`src/sampler.py`, class `Sampler`):

- `gumbel_max` is `Sampler.gumbel_max` ("vocabulary"): argmax over v of z[v] / T + g[v].
- `top_p_gumbel_max` is `Sampler.top_p_gumbel_max` ("top-p token"): the noise is drawn over
  the whole vocabulary in token-id order (so g[v] belongs to token v whatever the
  distribution), the nucleus is the tokens whose probability mass *before* them in descending
  order is <= p (`probs_sum - probs_sort > top_p` is their mask: the token that crosses p is
  kept), and excluded tokens are masked after the noise is added (their code zeroes their
  probability, so log p = -inf, and their noise). Their renormalisation of the kept
  probabilities adds one constant to every kept log p and z / T differs from log softmax(z / T)
  by one constant too, so the argmax is over the nucleus of z / T + g, as here.
- `top_k_gumbel_max` is `Sampler.top_k_gumbel_max` ("top-k token"): the same with the k most
  probable tokens kept (`probs_sort[:, k:] = 0`).
- `replacement_token` is `Sampler.intervention`, their automatic intervention
  (`src/stability.py`): the factual token is replaced by a draw from the top-p
  (`top_p_intervention` = 0.9) nucleus of softmax(z / T) with the factual token removed and the
  rest renormalised, from a generator freshly seeded with its own seed (`intervention_seed` =
  42) at every call; if the factual token was the whole nucleus, the second most probable token.

Because the noise is tied to token ids, a factual and a counterfactual generation with the same
seed give token v the same g_t[v] at step t even where their nuclei differ, so top-p and top-k
counterfactuals remain a Gumbel-max SCM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

SAMPLERS = ("full", "top_p", "top_k")


@dataclass(frozen=True)
class GumbelConfig:
    """Sampling settings of the Gumbel-max SCM (Chatzi et al. 2024, `src/sampler.py`).

    Attributes:
        temperature: finite T > 0 in softmax(z / T); 1.0 samples from the model's distribution
            (the authors use 0.6 in `src/single_query.py` and 0.9 for their stories,
            `scripts/story_query.py`).
        max_new_tokens: generation steps at most (factual and counterfactual alike).
        stop_at_eos: stop after an EOS token (the generation config's or the tokenizer's,
            `tokenprobe.models.eos_ids`) is generated.
        sampler: "full" (their "vocabulary"), "top_p" (their "top-p token") or "top_k" (their
            "top-k token"); see `sample_token`.
        top_p: the nucleus mass p in (0, 1], with sampler="top_p" only (theirs: 0.9; 1 keeps
            the whole vocabulary, which their code does not accept).
        top_k: the number k >= 1 of tokens kept, with sampler="top_k" only (theirs: 10 in
            `src/single_query.py`, 5 for their stories).
        replacement_top_p: the nucleus mass of `replacement_token` (their
            `top_p_intervention`, 0.9).
        replacement_seed: the seed of `replacement_token` (their `intervention_seed`, 42).
    """

    temperature: float = 1.0
    max_new_tokens: int = 32
    stop_at_eos: bool = True
    sampler: str = "full"
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    replacement_top_p: float = 0.9
    replacement_seed: int = 42

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {SAMPLERS}")
        for name, needed in (("top_p", "top_p"), ("top_k", "top_k")):
            given = getattr(self, name) is not None
            if given != (self.sampler == needed):
                raise ValueError(f"{name} goes with sampler={needed!r} and only with it "
                                 f"(sampler={self.sampler!r}, {name}={getattr(self, name)})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 < self.replacement_top_p <= 1:
            raise ValueError(f"replacement_top_p must be in (0, 1], got {self.replacement_top_p}")
        if not 0 <= self.replacement_seed < 2**63:
            raise ValueError(f"replacement_seed must be in [0, 2**63), got {self.replacement_seed}")


def gumbel_noise(seed: int, vocab: int) -> Iterator[torch.Tensor]:
    """Step-by-step Gumbel(0, 1) noise: the t-th item is g_t, a (vocab,) float32 CPU tensor.

    g = -log(-log(u)) with u uniform from a CPU `torch.Generator` seeded with `seed`, so the
    same seed gives the same noise on every device. Entry v is token id v's noise.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tiny = torch.finfo(torch.float32).tiny
    while True:
        u = torch.rand(vocab, generator=gen, dtype=torch.float32)  # (V,) in [0, 1)
        yield -torch.log(-torch.log(u.clamp_min(tiny)))


def gumbel_max(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """The Gumbel-max sample argmax(logits / T + g) over the last dimension.

    Args:
        logits: (..., V) logits z.
        noise: (..., V) Gumbel(0, 1) noise g (broadcastable).
        temperature: T > 0.

    Returns:
        (...) long token ids, distributed as softmax(z / T) when g is Gumbel(0, 1) iid.
    """
    return (logits.float() / temperature + noise.to(logits.device)).argmax(-1)


def _sorted_probs(logits: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z / T) in float32 sorted in descending order (stably: equal probabilities in
    token-id order), and the token ids in that order; both (..., V)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.sort(probs, dim=-1, descending=True, stable=True)


def top_p_keep(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The nucleus of softmax(z / T) as a (..., V) bool mask over token ids (True: kept).

    A token is kept when the mass of the tokens before it in descending order is <= p, as
    `probs_sum - probs_sort > top_p` excludes in their `Sampler.top_p_gumbel_max`; p = 1 keeps
    every token (the float32 cumulative sum can pass 1 before the least probable token).
    """
    if top_p >= 1:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    probs_sort, order = _sorted_probs(logits, temperature)
    kept_sorted = ~(probs_sort.cumsum(-1) - probs_sort > top_p)  # (..., V) in sorted order
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)  # back to id order


def top_k_keep(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The k most probable tokens of softmax(z / T) as a (..., V) bool mask over token ids."""
    _, order = _sorted_probs(logits, temperature)
    kept_sorted = torch.arange(order.shape[-1], device=order.device) < top_k  # (V,)
    return torch.zeros_like(order, dtype=torch.bool).scatter(
        -1, order, kept_sorted.expand(order.shape))


def _masked_gumbel_max(logits: torch.Tensor, noise: torch.Tensor, temperature: float,
                       keep: torch.Tensor) -> torch.Tensor:
    scores = logits.float() / temperature + noise.to(logits.device)  # (..., V), noise by id
    return scores.masked_fill(~keep, -math.inf).argmax(-1)  # masked after adding the noise


def top_p_gumbel_max(logits: torch.Tensor, noise: torch.Tensor, temperature: float,
                     top_p: float) -> torch.Tensor:
    """Top-p Gumbel-max: argmax over the nucleus (`top_p_keep`) of logits / T + g.

    Args:
        logits: (..., V) logits z.
        noise: (..., V) Gumbel(0, 1) noise g over the whole vocabulary, entry v token v's.
        temperature: T > 0.
        top_p: p in (0, 1].

    Returns:
        (...) long token ids, distributed as softmax(z / T) renormalised over the nucleus.
    """
    return _masked_gumbel_max(logits, noise, temperature, top_p_keep(logits, temperature, top_p))


def top_k_gumbel_max(logits: torch.Tensor, noise: torch.Tensor, temperature: float,
                     top_k: int) -> torch.Tensor:
    """Top-k Gumbel-max: argmax over the k most probable tokens of logits / T + g (shapes as
    `top_p_gumbel_max`)."""
    return _masked_gumbel_max(logits, noise, temperature, top_k_keep(logits, temperature, top_k))


def sample_token(logits: torch.Tensor, noise: torch.Tensor, config: GumbelConfig
                 ) -> torch.Tensor:
    """The token `config.sampler` picks from (..., V) logits with (..., V) noise; (...) ids."""
    if config.sampler == "full":
        return gumbel_max(logits, noise, config.temperature)
    if config.sampler == "top_p":
        return top_p_gumbel_max(logits, noise, config.temperature, config.top_p)
    if config.sampler == "top_k":
        return top_k_gumbel_max(logits, noise, config.temperature, config.top_k)
    raise ValueError(f"unknown sampler {config.sampler!r}; use one of {SAMPLERS}")


def replacement_token(logits: torch.Tensor, factual_token: int, *, temperature: float,
                      top_p: float = 0.9, seed: int = 42) -> int:
    """Chatzi et al.'s replacement for `factual_token` (`Sampler.intervention`).

    A draw (`torch.multinomial`, a CPU generator seeded with `seed`, so every call with the
    same seed draws the same uniform) from the top-p nucleus of softmax(z / T) with
    `factual_token` removed and the rest renormalised; the second most probable token when the
    factual token was the whole nucleus. Never `factual_token`.

    Args:
        logits: (V,) logits z at the intervened step.
        factual_token: the factual token id there.
        temperature: T > 0 of the generation.
        top_p: p in (0, 1] (their `top_p_intervention`).
        seed: their `intervention_seed`.
    """
    probs_sort, order = _sorted_probs(logits.detach().to("cpu"), temperature)  # (V,) each
    kept = probs_sort.clone()
    if top_p < 1:  # as `top_p_keep`
        kept[probs_sort.cumsum(-1) - probs_sort > top_p] = 0.0
    kept[order == factual_token] = 0.0
    if not bool(kept.any()):
        return int(order[1])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.multinomial((kept / kept.sum()).unsqueeze(0), 1, generator=gen)  # (1, 1)
    return int(order[int(pick)])
