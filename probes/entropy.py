"""Next-token uncertainty per token: entropy, rank, self-certainty, window entropy, entropy bands,
forking tokens, the logit lens, and two-model divergences (TIP, cDPO's contrastive score).

Definitions and defaults: README, "Measures". Row `pos` of `tokens`
describes the distribution p_pos computed at position pos - 1 that predicted the token at pos;
position 0 has none (NaN). Sources:
- self-certainty: Kang et al., "Scalable Best-of-N Selection via Self-Certainty"
  (backprop07/Self-Certainty): c_t = KL(U || p_t);
- window entropy: ARES (shawn0728/ARES): mean of H over the next w tokens (their code; the
  paper's window starts at t: `window_from="current"`);
- bands and forking tokens: Wang et al., "Beyond the 80/20 Rule" (high-entropy minority
  tokens, rho = 0.2), as SPINE uses them;
- TIP (Xu et al., "Token Importance in On-Policy Distillation"): student entropy H / ln V and
  JSD(student || teacher) / ln 2, split at thresholds into four quadrants; the paper's Q3
  ("overconfident": low entropy, high divergence) is `low_H_high_D` here;
- cDPO contrastive estimation (Lin et al., "Critical Tokens Matter"):
  s_t = softmax((1 + beta) z_pos - beta z_neg)[y_t], the probed model as z_pos.

The logits are never materialised: every statistic streams over the vocabulary in
tokenprobe.kernels.linear_entropy / two_model, from the final-normed residual of the last block
(the probe applies the model's final norm to the hooked residual itself, so it works through
every backend).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.two_model import two_model_divergence
from tokenprobe.probe import Option, Probe, nonfinite_frame, nonfinite_row, register
from tokenprobe.probes.entropy_config import EntropyConfig
from tokenprobe.probes.entropy_measures import (bands_at, entropy_bands, forking_at,
                                                run_diagnostics, run_quantiles, run_summary,
                                                scored_sql, scored_tokens, strict_mean,
                                                tip_quadrant, tip_quadrant_at,
                                                tip_thresholds, tip_weight, topk_entropy,
                                                window_entropy)
from tokenprobe.placement import input_device
from tokenprobe.tables import Column
from tokenprobe.tokens import token_text
from tokenprobe.unembedding import Unembedding

CHECKED = ("entropy", "logprob", "self_certainty", "top1_prob", "teacher_entropy",
           "teacher_logprob", "kl_student_teacher", "kl_teacher_student", "jsd", "critical_ce")


C = Column


@register
class EntropyProbe(Probe):
    """Per-token next-token statistics (table `tokens`), the logit lens (`token_layers`) and,
    with a compare model, two-model divergences; per-prompt summaries in `prompts`.

    Everything is reduced inside the hooks: the last block's hook computes the per-token
    statistics from its residual. The logit lens compares each layer with the final
    distribution, which exists only after the last block: it takes a second forward pass,
    holding the final-normed residual of the first (one per batch, never one per layer) and
    reducing each layer against it inside that layer's hook.
    """

    name = "entropy"
    finalizes = ("tokens", "prompts")  # bands, forking and per-prompt means
    sites = ("resid_post",)
    Config = EntropyConfig
    tables = {
        "tokens": {  # of p_pos, the next-token distribution computed at pos - 1 (NA at pos 0)
            "entropy": C("float64", "-sum_v p log p (nats)"),
            "logprob": C("float64", "log p_pos[token_id]"),
            "rank": C("Int64", "1 + number of vocab entries with strictly larger probability"),
            "top1_id": C("Int64", "most likely token id"),
            "top1_prob": C("float64", "p(top1)"),
            "alternatives": C("string", "the topk (3) most likely tokens of p_pos with their "
                                        "probabilities, e.g. 'Paris' 0.41 | 'the' 0.12"),
            "margin": C("float64", "p(top1) - p(top2)"),
            "self_certainty": C("float64", "KL(U || p_pos) (Kang et al.)"),
            "window_entropy": C("float64", "ARES window mean of entropy (w = 4, t+1..t+w by "
                                           "default; NaN where the window is cut by the end)"),
            "topk_entropy": C("float64", "entropy of the top-k probabilities (window_topk; "
                                         "ARES's vLLM top-10 logprobs), nats"),
            "band": C("string", "low / mid / high by entropy quantiles (0.5, 0.8; per run or "
                                "prompt) of the scored tokens; NA elsewhere"),
            "forking": C("boolean", "among the max(1, ceil(rho N)) highest-entropy of the N "
                                    "scored tokens, rho = 0.2 (Wang et al.); NA elsewhere"),
            "teacher_entropy": C("float64", "entropy of the compare model q (nats)"),
            "teacher_logprob": C("float64", "log q[token_id]"),
            "kl_student_teacher": C("float64", "KL(p || q) (nats)"),
            "kl_teacher_student": C("float64", "KL(q || p) (nats)"),
            "jsd": C("float64", "Jensen-Shannon divergence of p and q (nats, <= ln 2)"),
            "tip_quadrant": C("string", "TIP quadrant {high,low}_H_{high,low}_D: entropy and "
                                        "JSD against their run medians (tip_thresholds="
                                        "quantile, tokenprobe's choice) or H / ln V, JSD / ln 2 "
                                        "against 0.5 (fixed)"),
            "tip_weight": C("float64", "TIP code's sampling weight (H / ln V)^alpha x "
                                       "(JSD / ln 2)^gamma (1, 1)"),
            "critical_ce": C("float64", "cDPO contrastive score softmax((1+beta) z_p - beta "
                                        "z_q)[token_id]")},
        "token_layers": {
            "lens_entropy": C("float64", "entropy of the logit lens softmax(W_U LN_f(h_l"
                                         "[pos - 1])) (nats; lens=True; NA at pos 0)"),
            "lens_kl_to_final": C("float64", "KL(lens distribution || final distribution) at "
                                             "the same position")},
        "prompts": {
            "mean_entropy": C("float64", "mean entropy over the prompt's scored tokens (nats; "
                                         "its response only, with score=response)"),
            "mean_self_certainty": C("float64", "mean self-certainty (Kang et al.'s sequence "
                                                "score)"),
            "perplexity": C("float64", "exp(-mean logprob) over the scored tokens"),
            "forking_share": C("float64", "share of the scored tokens flagged `forking`")},
    }

    def __init__(self, config: EntropyConfig | None = None, *, compare: Any = None) -> None:
        """Args:
            config: settings (defaults: README, "Measures").
            compare: a second model (a `tokenprobe.load()` result) with the same vocabulary:
                the teacher for TIP, or the negative model for cDPO's `critical_ce`.
        """
        super().__init__(config)
        self.compare = compare
        if self.config.contrast_beta is not None and compare is None:
            raise ValueError("contrast_beta (cDPO's critical_ce) needs a compare model: the "
                             "negative model to contrast with")

    @classmethod
    def options(cls) -> list[Option]:
        return [*super().options(), Option(
            "compare", "model", None, "a second model over the same vocabulary: adds teacher "
            "entropy, KL both ways, JSD and the TIP quadrant per token (the probed model is the "
            "student); with contrast_beta, the negative model of cDPO", aliases=("--compare",))]

    @classmethod
    def from_options(cls, values, load=None) -> "EntropyProbe":
        values = dict(values)
        compare = values.pop("compare", None)
        config = cls.Config(**values)
        if config.contrast_beta is not None and not compare:
            raise ValueError("contrast_beta needs compare, the negative model (CLI: "
                             "--contrast-beta needs --compare NEGATIVE_MODEL: cDPO contrasts "
                             "the probed model with a model tuned on incorrect answers)")
        if compare and load is None:
            raise ValueError("the compare option names a model, and no loader was given")
        return cls(config, compare=load(compare) if compare else None)

    @property
    def passes(self) -> int:
        return 2 if self.config.lens else 1

    def describe(self) -> dict:
        out = super().describe()
        if self.compare is not None:
            out["compare"] = {"model": self.compare.name, "weights_fingerprint":
                              self.compare.fingerprint}
        return out

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.unembed, self.tokenizer = Unembedding.of(model), tokenizer
        capped = self.unembed.softcap is not None or (
            self.compare is not None and Unembedding.of(self.compare.model).softcap is not None)
        if self.config.temperature != 1.0 and capped:
            raise ValueError("temperature != 1 needs an unembedding without final-logit soft "
                             "capping (logits / T is then (h / T) W^T); this model caps them")
        if self.compare is None:
            return
        self.cmp_unembed = Unembedding.of(self.compare.model)
        v_p, v_q = self.unembed.weight.shape[0], self.cmp_unembed.weight.shape[0]
        if v_p != v_q or tokenizer.get_vocab() != self.compare.tokenizer.get_vocab():
            raise ValueError(f"the compare model {self.compare.name} does not share the "
                             f"vocabulary of the probed model ({v_q} vs {v_p} unembedding rows, "
                             "or different token ids): two-model measures need the same "
                             "tokenizer")

    def begin(self, batch) -> None:
        super().begin(batch)
        self._forget()
        self._compared = self._compare_hidden() if self.compare is not None else None

    def _forget(self) -> None:
        self._pass = 0
        self._compared: torch.Tensor | None = None  # the compare model's rows, until the last hook
        self._columns: dict[str, np.ndarray] | None = None  # per scored token
        self._lens: dict[int, dict[str, np.ndarray]] = {}  # layer -> per scored token
        self._reference: torch.Tensor | None = None  # final-normed rows, during the lens pass

    def begin_pass(self, index: int) -> None:
        self._pass = index

    def observe(self, site: str, layer: int, h: torch.Tensor) -> None:
        last = layer == self.unembed.n_layers - 1
        if self._pass == 0 and last:
            hidden = self._rows(self.unembed.norm(h))  # (N, D), as the model's lm_head sees it
            self._columns = self._final(hidden)
            if self.config.lens:
                self._reference = hidden
        elif self._pass == 1:
            ue = self.unembed
            d = two_model_divergence(self._rows(ue.norm(h)), ue.weight, self._reference,
                                     ue.weight, bias_p=ue.bias, bias_q=ue.bias,
                                     softcap_p=ue.softcap, softcap_q=ue.softcap, jsd=False,
                                     impl=self.config.impl)
            self._lens[layer] = {"lens_entropy": d["entropy_p"].cpu().numpy(),
                                 "lens_kl_to_final": d["kl_pq"].cpu().numpy()}
            if last:
                self._reference = None

    def _rows(self, h: torch.Tensor) -> torch.Tensor:
        """Positions 0..n-2 of every row (each predicts the next token), concatenated: (N, D)."""
        return torch.cat([h[b, :n - 1] for b, _, n in self.batch.rows()])

    def _final(self, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        """The per-token statistics of the final distribution (and the compare model's)."""
        batch, ue, cfg = self.batch, self.unembed, self.config
        targets = torch.cat([batch.input_ids[b, 1:n] for b, _, n in batch.rows()])
        bias = ue.bias
        if cfg.temperature != 1.0:  # logits / T = (h / T) W^T + b / T (no soft cap: `bind`)
            hidden = hidden / cfg.temperature
            bias = None if bias is None else bias / cfg.temperature
            if self._compared is not None:
                self._compared = self._compared / cfg.temperature
        stats = linear_entropy(hidden, ue.weight, bias=bias, softcap=ue.softcap,
                               targets=targets, topk=max(cfg.topk, cfg.window_topk or 0),
                               impl=cfg.impl)
        probs = stats["topk_probs"]
        columns = {
            "entropy": stats["entropy"], "logprob": stats["target_logprob"],
            "rank": stats["target_rank"], "top1_id": stats["topk_ids"][:, 0],
            "top1_prob": probs[:, 0], "margin": probs[:, 0] - probs[:, 1],
            "self_certainty": stats["self_certainty"],
        }
        if self.compare is not None:
            columns.update(self._compare(hidden, targets))
            self._compared = None
        out = {k: v.detach().cpu().numpy() for k, v in columns.items()}
        out["alternatives"] = self._alternatives(stats["topk_ids"][:, :cfg.topk].cpu().numpy(),
                                                 probs[:, :cfg.topk].cpu().numpy())
        if cfg.window_topk:
            out["topk_entropy"] = topk_entropy(probs[:, :cfg.window_topk].cpu().numpy(),
                                               tail=cfg.window_tail)
        return out

    def collect(self) -> dict[str, pd.DataFrame]:
        cfg, ue = self.config, self.unembed
        if self._columns is None:
            raise RuntimeError("the entropy probe saw no residual of the last block")
        tokens = self._frame(self._columns)
        source = "topk_entropy" if cfg.window_topk else "entropy"
        ends = np.cumsum(self.batch.lengths)[:-1]  # each prompt's rows, in batch order
        tokens["window_entropy"] = np.concatenate([
            window_entropy(h, cfg.window, start=cfg.window_from, partial=cfg.window_partial)
            for h in np.split(tokens[source].to_numpy(float), ends)])
        if self.compare is not None:
            h, jsd, v = tokens.entropy.to_numpy(float), tokens.jsd.to_numpy(float), ue.weight.shape[0]
            if cfg.tip_thresholds == "fixed":  # else at the run's quantiles (finalize)
                tokens["tip_quadrant"] = pd.array(tip_quadrant(
                    h, jsd, v, entropy_threshold=cfg.tip_entropy,
                    divergence_threshold=cfg.tip_divergence), dtype="string")
            tokens["tip_weight"] = tip_weight(h, jsd, v, alpha=cfg.tip_alpha, gamma=cfg.tip_gamma)
        out = {"tokens": tokens}
        bad = self._nonfinite(tokens, "logits", [ue.n_layers - 1], CHECKED)
        if cfg.lens:
            layers = sorted(self._lens)
            lens = self._frame({name: np.concatenate([self._lens[layer][name] for layer in layers])
                                for name in self._lens[layers[0]]}, layers)
            bad += self._nonfinite(lens, "lens", layers, ("lens_entropy", "lens_kl_to_final"))
            out["token_layers"] = lens
        out["nonfinite"] = nonfinite_frame(bad)
        self._forget()
        return out

    def _nonfinite(self, frame: pd.DataFrame, site: str, layers: list[int],
                   columns: tuple[str, ...]) -> list[dict | None]:
        """`nonfinite` rows of the scored positions (pos >= 1) of each prompt in `frame`, a
        `_frame` of `layers` (its rows: layer, prompt, position)."""
        lengths = self.batch.lengths
        starts = np.cumsum(lengths) - np.asarray(lengths)
        values = {c: frame[c].to_numpy(float).reshape(len(layers), -1)  # (L, N)
                  for c in columns if c in frame}
        bad = np.logical_or.reduce([~np.isfinite(v) for v in values.values()]) \
            & (frame.pos.to_numpy().reshape(len(layers), -1) > 0)
        return [nonfinite_row(self.name, site, self.batch.prompt_ids[row], layers[i],
                              {c: v[i, starts[row] + 1:starts[row] + lengths[row]]
                               for c, v in values.items()}, offset=1)
                for i, row in zip(*np.nonzero(np.logical_or.reduceat(bad, starts, axis=1)))]

    def _compare_hidden(self) -> torch.Tensor:
        """The compare model's final-normed residual rows on the batch, (N, D_q): its forward
        runs before the probed model's, so that no forward is nested in a hook."""
        model, batch = self.compare.model, self.batch
        device = input_device(model)  # its embedding's device (meta when offloaded)
        out = model.get_decoder()(input_ids=batch.input_ids.to(device),
                                  attention_mask=batch.attention_mask.to(device),
                                  use_cache=False)
        return self._rows(out.last_hidden_state)  # after its final norm

    def _compare(self, hidden: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two-model columns against the compare model's rows (`_compare_hidden`)."""
        cfg, cue = self.config, self.cmp_unembed
        hq = self._compared.to(hidden.device)
        d = two_model_divergence(hidden, self.unembed.weight, hq, cue.weight.to(hidden.device),
                                 bias_p=self._tempered(self.unembed.bias),
                                 bias_q=self._tempered(cue.bias),
                                 softcap_p=self.unembed.softcap, softcap_q=cue.softcap,
                                 targets=targets, contrast_beta=cfg.contrast_beta, impl=cfg.impl)
        cols = {"teacher_entropy": d["entropy_q"], "teacher_logprob": d["target_logprob_q"],
                "kl_student_teacher": d["kl_pq"], "kl_teacher_student": d["kl_qp"],
                "jsd": d["jsd"]}
        if cfg.contrast_beta is not None:
            cols["critical_ce"] = d["contrast_logprob"].exp()
        return cols

    def _alternatives(self, ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """One text per row: its top-k tokens (readable, quoted) and probabilities."""
        text = functools.lru_cache(maxsize=None)(lambda i: token_text(self.tokenizer, i))
        return np.array([" | ".join(f"'{text(int(i))}' {p:.3g}" for i, p in zip(row, prow))
                         for row, prow in zip(ids, probs)], dtype=object)

    def _tempered(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """A logit bias divided by the temperature (as the hidden rows are)."""
        t = self.config.temperature
        return bias if bias is None or t == 1.0 else bias / t

    def _frame(self, values: dict[str, np.ndarray], layers: list[int] | None = None
               ) -> pd.DataFrame:
        """Rows (prompt_id, pos) for every real position, in batch order; pos 0 (no prediction)
        gets NA. With `layers`, those rows for each layer in turn, with column `layer`, and
        each of `values` holds the layers' (N,) arrays one after another."""
        lengths, repeat = np.array(self.batch.lengths), 1 if layers is None else len(layers)
        pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (N,)
        part = {"prompt_id": np.tile(np.repeat(np.array(self.batch.prompt_ids, dtype=np.int64),
                                               lengths), repeat)}
        if layers is not None:
            part["layer"] = np.repeat(np.array(layers, dtype=np.int64), len(pos))
        part["pos"] = pos = np.tile(pos, repeat)
        for k, v in values.items():
            text = v.dtype == object
            part[k] = np.full(len(pos), None if text else np.nan, dtype=object if text else float)
            part[k][pos > 0] = v  # p_pos was computed at pos - 1
        frame = pd.DataFrame(part)
        for k in ("rank", "top1_id"):
            if k in frame:
                frame[k] = frame[k].astype("Int64")
        return frame

    def statistics(self, sql) -> dict:
        """The band and forking thresholds over the whole run's scored tokens
        (`quantiles_over="run"`; `run_quantiles`) and, with a compare model, TIP's quadrant
        thresholds (`tip_thresholds="quantile"`; always over the run)."""
        cfg, columns = self.config, sql.columns("tokens")
        where = scored_sql(columns, cfg.score)
        stats = run_quantiles(sql, where, cfg) if cfg.quantiles_over == "run" else {}
        if "jsd" in columns and cfg.tip_thresholds == "quantile":
            stats.update(tip_thresholds(sql, where, cfg.tip_quantile))
        return stats

    def finalize(self, tables: dict[str, pd.DataFrame], stats: dict) -> dict[str, pd.DataFrame]:
        """Bands and forking flags of the scored tokens (at the run's thresholds `stats`, or
        each prompt's own) and per-prompt summaries over them: mean entropy, mean
        self-certainty, perplexity, share of forking tokens; of one part (whole prompts)."""
        cfg = self.config
        tokens = tables["tokens"].copy()
        scored = scored_tokens(tokens, cfg.score)
        if cfg.quantiles_over == "run":
            tokens["band"] = bands_at(tokens.entropy, stats, scored)
            tokens["forking"] = forking_at(tokens, scored, stats)
        else:
            tokens["band"] = pd.Series(pd.NA, index=tokens.index, dtype="string")
            tokens["forking"] = pd.Series(pd.NA, index=tokens.index, dtype="boolean")
            for _, group in tokens.groupby("prompt_id"):
                band, forking, _ = entropy_bands(
                    group.entropy, scored[group.index], low_quantile=cfg.low_quantile,
                    high_quantile=cfg.high_quantile, rho=cfg.rho)
                tokens.loc[group.index, "band"], tokens.loc[group.index, "forking"] = band, forking
        if "tip_entropy_at" in stats:
            tokens["tip_quadrant"] = pd.array(tip_quadrant_at(
                tokens.entropy, tokens.jsd, stats["tip_entropy_at"], stats["tip_jsd_at"]),
                dtype="string")
        # a NaN among these is non-finite: the prompt's means are NaN
        summed = tokens[scored_tokens(tokens, cfg.score, finite=False)]
        per_prompt = summed.groupby("prompt_id").agg(
            mean_entropy=("entropy", strict_mean),
            mean_self_certainty=("self_certainty", strict_mean),
            perplexity=("logprob", lambda x: math.exp(-strict_mean(x))),
            forking_share=("forking", lambda x: float(x.astype(float).mean(skipna=False))))
        prompts = tables["prompts"].drop(columns=list(per_prompt.columns), errors="ignore")
        prompts = prompts.merge(per_prompt.reset_index(), on="prompt_id", how="left")
        return {"tokens": tokens, "prompts": prompts}

    def diagnostics(self, sql, stats: dict, meta: dict) -> list[str]:
        """`run_diagnostics`: bands and forking flags over too few tokens."""
        return run_diagnostics(sql, self.config)

    def summary(self, sql, stats: dict) -> dict:
        """`run_summary`: the run's scored tokens, means, perplexity and thresholds."""
        return run_summary(sql, self.config, stats)
