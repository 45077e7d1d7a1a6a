"""The entropy probe's settings, with the papers' defaults (README, "Measures")."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenprobe.kernels.linear_entropy import IMPLS


@dataclass(frozen=True)
class EntropyConfig:
    """Entropy probe settings (defaults: README, "Measures").

    Attributes:
        window: ARES window w (4).
        window_from: "next" averages H over t+1..t+w (ARES code, the default), "current" over
            t..t+w-1 (the paper).
        window_partial: average what is left of a window cut by the end of the prompt (NaN by
            default: ARES's code counts only complete windows).
        window_topk: average the entropy of the top-k probabilities instead (ARES's code reads
            vLLM's top-10 logprobs: 10 makes its 1.5-nat threshold mean what it did there);
            adds column `topk_entropy`. None: the full-vocabulary entropy.
        window_tail: with window_topk, add -r log r for the mass r outside the top k (ARES's
            trigger function does).
        low_quantile: entropy below this quantile is band "low" (0.5).
        high_quantile: entropy at or above this quantile is band "high" (0.8).
        rho: forking tokens are the top rho by entropy (0.2, Wang et al.): exactly
            max(1, ceil(rho N)) of the N scored tokens, as their code takes them.
        quantiles_over: "run" (all scored tokens of the run) or "prompt" (each prompt's own).
            The 80/20 code pools a training micro-batch of responses: "run" over a run of
            those responses is that pooling; "prompt" is one response at a time.
        score: "response" scores only the response of prompts given with one (prompt /
            response pairs, chat messages ending with the assistant's), every token of the
            others; "all" scores every token. Scored tokens make the quantiles, bands, forking
            flags and per-prompt summaries; the per-token statistics cover every token.
        topk: most likely tokens kept per position (>= 2; top1_prob and margin use two; all
            of them, with their probabilities, in column `alternatives`).
        lens: also compute the logit lens per layer (lens_entropy, lens_kl_to_final in
            `token_layers`); costs a second forward pass and one more unembedding pass
            per layer.
        contrast_beta: cDPO beta (1.0 in the paper); with a compare model, adds `critical_ce`.
        tip_thresholds: "quantile" (default, tokenprobe's choice: TIP's code has no quadrant
            thresholds) splits both axes at their `tip_quantile` over the run's scored tokens;
            "fixed" at `tip_entropy` on H / ln V and `tip_divergence` on JSD / ln 2.
        tip_quantile: the quantile of entropy and of JSD that splits the quadrants (0.5).
        tip_entropy: fixed threshold on H / ln V (0.5; 5.4 nats for V = 49,152, which few
            tokens reach).
        tip_divergence: fixed threshold on JSD / ln 2 (0.5).
        tip_alpha, tip_gamma: exponents of TIP's sampling weight (H / ln V)^alpha x
            (JSD / ln 2)^gamma, column `tip_weight` (1.0, 1.0).
        temperature: every next-token statistic is of softmax(logits / temperature), the
            distribution sampled at that temperature (the 80/20 code's entropies: 1.0 in its
            scripts); the compare model's too. Not with a soft-capped unembedding.
        impl: kernel implementation ("auto", "torch", "triton", "reference").
    """

    window: int = 4
    window_from: str = field(default="next", metadata={"choices": ("next", "current")})
    window_partial: bool = False
    window_topk: int | None = None
    window_tail: bool = False
    low_quantile: float = 0.5
    high_quantile: float = 0.8
    rho: float = 0.2
    quantiles_over: str = field(default="run", metadata={"choices": ("run", "prompt"),
                                                         "aliases": ("--quantiles",)})
    score: str = field(default="response", metadata={"choices": ("response", "all"),
                                                     "aliases": ("--score",)})
    topk: int = 3
    lens: bool = field(default=False, metadata={"aliases": ("--lens",)})
    contrast_beta: float | None = field(default=None, metadata={"aliases": ("--contrast-beta",)})
    tip_thresholds: str = field(default="quantile", metadata={"choices": ("quantile", "fixed")})
    tip_quantile: float = 0.5
    tip_entropy: float = 0.5
    tip_divergence: float = 0.5
    tip_alpha: float = 1.0
    tip_gamma: float = 1.0
    temperature: float = 1.0
    impl: str = field(default="auto", metadata={"choices": IMPLS})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.window_from not in ("next", "current"):
            raise ValueError(f'window_from must be "next" or "current", got {self.window_from!r}')
        if not 0 < self.low_quantile <= self.high_quantile < 1:
            raise ValueError("need 0 < low_quantile <= high_quantile < 1, got "
                             f"{self.low_quantile}, {self.high_quantile}")
        if not 0 < self.rho < 1:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        if self.quantiles_over not in ("run", "prompt"):
            raise ValueError(f'quantiles_over must be "run" or "prompt", got {self.quantiles_over!r}')
        if self.tip_thresholds not in ("quantile", "fixed"):
            raise ValueError(f'tip_thresholds must be "quantile" or "fixed", got '
                             f"{self.tip_thresholds!r}")
        if not 0 < self.tip_quantile < 1:
            raise ValueError(f"tip_quantile must be in (0, 1), got {self.tip_quantile}")
        if self.score not in ("response", "all"):
            raise ValueError(f'score must be "response" or "all", got {self.score!r}')
        if self.window_topk is not None and self.window_topk < 1:
            raise ValueError(f"window_topk must be >= 1 (or None), got {self.window_topk}")
        if self.topk < 2:
            raise ValueError(f"topk must be >= 2 (top1_prob and margin), got {self.topk}")
