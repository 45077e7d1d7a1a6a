"""Attribution of a target to prompt units (tokens, words, sentences, spans) by every method:
saliency, input x gradient, integrated gradients, Shapley values, and removal and attention
knockout of a whole unit; optionally the compression curve. Tables `unit_attributions` and
`attribution_curves` (`tokenprobe attribute --method ...`).

Sign: every method but saliency reports a contribution, positive when the unit raises the
target (removal: f(all) - f(all without the unit); knockout: f - f with the unit's keys
masked). Saliency is a gradient norm (>= 0). The token-level `attributions` table keeps its
own convention (delta = ablated - base).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from tokenprobe.analyses import attribution_gradients as grads
from tokenprobe.analyses.attribution import (KNOCKOUT_TO, _score, attention_knockout,
                                             target_queries)
from tokenprobe.analyses.attribution_compression import FRACTIONS, compression_curve
from tokenprobe.analyses.attribution_shapley import ABSENT, UnitGame, shapley
from tokenprobe.analyses.attribution_targets import Target, resolve_target
from tokenprobe.analyses.attribution_units import KINDS, Unit, split_units
from tokenprobe.models import LoadedModel
from tokenprobe.placement import input_device
from tokenprobe.store import Run, RunWriter, check_target, prompt_tables
from tokenprobe.tables import Column, Table, conform, declare

UNIT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "shapley", "removal",
                "knockout")
COLUMNS = ["prompt_id", "method", "unit_id", "text", "char_start", "char_end", "positions",
           "value", "se"]
RANK_ORDER = ("shapley", "integrated_gradients", "input_x_gradient", "removal", "knockout",
              "saliency")  # the default ranking of the compression curve: the first computed

C = Column
declare("unit_attribution", {
    "unit_attributions": Table(
        "prompt x method x unit (tokenprobe attribute --method ...; settings and targets in "
        'meta["summary"]["unit_attribution"])', ("prompt_id", "method", "unit_id"), {
            "prompt_id": C("int64", "key"),
            "method": C("string", "key: saliency / input_x_gradient / integrated_gradients / "
                                  "shapley / removal / knockout"),
            "unit_id": C("int64", "key: 0-based, in text order"),
            "text": C("string", "the unit's characters of the prompt"),
            "char_start": C("int64", "first character (offset into prompts.text)"),
            "char_end": C("int64", "one past the last"),
            "positions": C("string", "the unit's token positions in `tokens`, e.g. '3,4'"),
            "value": C("float64", "the unit's attribution (nats; positive: raises the target), "
                                  "saliency: the gradient norm over its tokens"),
            "se": C("float64", "standard error of a sampled Shapley value; 0 when exact or "
                               "deterministic")}),
    "attribution_curves": Table(
        "prompt x order x fraction kept (tokenprobe attribute --compression)",
        ("prompt_id", "order", "keep_fraction"), {
            "prompt_id": C("int64", "key"),
            "order": C("string", "key: top / bottom / random units kept, ranked by `ranking`"),
            "keep_fraction": C("float64", "key: the fraction of units kept"),
            "ranking": C("string", "the method whose values ranked the units"),
            "n_kept": C("int64", "units kept (ceil(fraction x n))"),
            "value": C("float64", "the target with only those units (nats; random: mean)"),
            "se": C("float64", "random: std of the draws / sqrt(draws); else 0"),
            "draws": C("int64", "subsets scored (random: draws; else 1)")})})
del C


@dataclass(frozen=True)
class UnitAttributionConfig:
    """Settings of unit attribution (see the module doc and each method's docstring).

    Attributes:
        methods: of `UNIT_METHODS`.
        units: "token", "word", "sentence" or "span" (with `delimiter` or given spans).
        delimiter: unit "span": cut the prompt after each occurrence.
        ig_steps, baseline: integrated gradients' quadrature points and baseline ("zero",
            "pad", "mask" or a text of as many tokens); Captum's defaults (50, zero).
        permutations: Shapley orders to sample (None: exact for <= 10 units, else 64).
        seed: the Shapley sampler's and the random subsets' seed.
        absent: how Shapley treats an absent unit: "removed" (deleted) or "filler".
        filler: the filler token ("pad", "mask" or a one-token text).
        knockout_layers: layers whose attention loses the unit's keys (None: all).
        to: knockout from every later query ("later") or the target's queries ("target").
        batch_size: rows per forward.
        compression: also compute the compression curve (ranked by `rank_by`, default the
            first computed of `RANK_ORDER`), with `fractions` and `draws` random subsets.
    """

    methods: tuple[str, ...] = ("integrated_gradients", "shapley", "removal")
    units: str = "word"
    delimiter: str | None = None
    ig_steps: int = 50
    baseline: str = "zero"
    permutations: int | None = None
    seed: int = 0
    absent: str = "removed"
    filler: str = "pad"
    knockout_layers: tuple[int, ...] | None = None
    to: str = "later"
    batch_size: int = 16
    compression: bool = False
    rank_by: str | None = None
    fractions: tuple[float, ...] = FRACTIONS
    draws: int = 8

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in UNIT_METHODS]
        if not self.methods or bad:
            raise ValueError(f"unknown method(s) {bad}; use of {', '.join(UNIT_METHODS)}")
        if self.units not in KINDS:
            raise ValueError(f"unknown unit kind {self.units!r}; use one of {', '.join(KINDS)}")
        if self.absent not in ABSENT or self.to not in KNOCKOUT_TO:
            raise ValueError(f"absent must be one of {ABSENT} and to one of {KNOCKOUT_TO}")
        if self.rank_by is not None and self.rank_by not in self.methods:
            raise ValueError(f"rank_by {self.rank_by!r} is not among the methods computed")
        if self.ig_steps < 1 or self.batch_size < 1:
            raise ValueError("ig_steps and batch_size must be >= 1")

    def ranking(self) -> str:
        return self.rank_by or next(m for m in RANK_ORDER if m in self.methods)


def knockout_units(loaded: LoadedModel, prompt_ids: Sequence[int], units: Sequence[Unit],
                   target: Target, *, layers: Sequence[int] | None = None, to: str = "later",
                   batch_size: int = 16) -> np.ndarray:
    """Per unit, f - f with every key of the unit cut from the queries of `layers` (all heads;
    `attention_knockout`): "later" queries, or only those predicting the target's tokens.
    Each option of a contrast is scored with its own tokens appended. (n_units,) float64."""
    model, device = loaded.model, input_device(loaded.model)
    layers = range(model.config.num_hidden_layers) if layers is None else layers
    n_p, out = len(prompt_ids), np.zeros(len(units))
    with torch.inference_mode():
        for opt, sign in target.options():
            ids = torch.tensor([list(prompt_ids) + list(opt)], device=device)  # (1, T)
            t, m = ids.shape[1], len(opt)
            base = float(_score(model, ids, m)[0])
            queries = target_queries(n_p, t) if to == "target" else None
            for a in range(0, len(units), batch_size):
                chunk = units[a:a + batch_size]
                knocked = torch.zeros(len(chunk), t, dtype=torch.bool)
                for row, unit in enumerate(chunk):
                    knocked[row, list(unit.positions)] = True
                with attention_knockout(model, layers, knocked, queries):
                    scores = _score(model, ids.expand(len(chunk), t), m)
                out[a:a + len(chunk)] += sign * (base - scores.double().cpu().numpy())
    return out


def attribute_units(loaded: LoadedModel, prompt: str, config: UnitAttributionConfig = \
                    UnitAttributionConfig(), *, continuation: str | Sequence[int] | None = None,
                    options: tuple[str, str] | None = None,
                    spans: Sequence[tuple[int, int]] | None = None, prompt_id: int = 0,
                    progress=None) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """One prompt's unit attributions by each of `config.methods`.

    Args:
        prompt: the text (the tokenizer's default special tokens).
        continuation / options: the target (`resolve_target`); neither: the greedy next token.
        spans: unit "span" given as character spans (else `config.delimiter`).
        progress: a tqdm bar (or callable) updated with forward rows.

    Returns:
        (`unit_attributions` rows, `attribution_curves` rows or None, summary dict: target,
        f(prompt), unit count, IG's completeness gap, Shapley's exactness, permutations,
        evaluations and absent-unit setting).
    """
    c = config
    ids, units = split_units(loaded.tokenizer, prompt, c.units, spans=spans,
                             delimiter=c.delimiter if c.units == "span" and spans is None
                             else None)
    target = resolve_target(loaded, ids, continuation=continuation, options=options)
    game = UnitGame(loaded, ids, units, target, absent="removed", batch_size=c.batch_size,
                    progress=progress)
    full = float(game.values(np.ones((1, len(units)), dtype=bool))[0])
    summary = {"prompt_id": prompt_id, "target": target.describe(), "target_kind": target.kind,
               "target_value": full, "n_units": len(units), "units": c.units}
    values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    zero = np.zeros(len(units))
    for method in c.methods:
        if method in ("saliency", "input_x_gradient"):
            fn = grads.saliency if method == "saliency" else grads.input_x_gradient
            values[method] = (grads.to_units(fn(loaded, ids, target), units, method), zero)
        elif method == "integrated_gradients":
            attr, gap = grads.integrated_gradients(loaded, ids, target, baseline=c.baseline,
                                                   steps=c.ig_steps, batch_size=c.batch_size,
                                                   progress=progress)
            values[method] = (grads.to_units(attr, units, method), zero)
            summary.update(ig_gap=gap, ig_steps=c.ig_steps, ig_baseline=c.baseline)
        elif method == "shapley":
            played = game if c.absent == "removed" else UnitGame(
                loaded, ids, units, target, absent=c.absent, filler=c.filler,
                batch_size=c.batch_size, progress=progress)
            est = shapley(played, permutations=c.permutations, seed=c.seed)
            values[method] = (est.values, est.se)
            summary.update(shapley_exact=est.exact, shapley_permutations=est.permutations,
                           shapley_evaluations=est.evaluations, **{
                               f"shapley_{k}": v for k, v in played.describe().items()
                               if k in ("absent", "filler", "filler_id", "filler_text")})
        elif method == "removal":
            leave_out = ~np.eye(len(units), dtype=bool)
            values[method] = (full - game.values(leave_out), zero)
        else:
            values[method] = (knockout_units(loaded, ids, units, target,
                                             layers=c.knockout_layers, to=c.to,
                                             batch_size=c.batch_size), zero)
    frame = pd.DataFrame([
        (prompt_id, method, u.index, u.text, u.char_start, u.char_end,
         ",".join(map(str, u.positions)), float(v[u.index]), float(se[u.index]))
        for method, (v, se) in values.items() for u in units],
        columns=COLUMNS)
    curves = None
    if c.compression:
        rank = c.ranking()
        curves = compression_curve(game, values[rank][0], fractions=c.fractions,
                                   draws=c.draws, seed=c.seed).assign(
            prompt_id=prompt_id, ranking=rank)
        summary["empty_value"] = float(game.values(np.zeros((1, len(units)), dtype=bool))[0])
    return frame, curves, summary | {"token_ids": ids}


def unit_attribution_run(loaded: LoadedModel, prompts: Sequence[str],
                         config: UnitAttributionConfig = UnitAttributionConfig(), *,
                         continuations: Sequence[str | None] | None = None,
                         options: tuple[str, str] | None = None, progress: bool = False,
                         out: str | os.PathLike | None = None, overwrite: bool = False) -> Run:
    """`attribute_units` over prompts (prompt_id = index) as a run: tables `prompts`, `tokens`
    (the prompt's tokens), `unit_attributions`, with `config.compression` also
    `attribution_curves`; `meta["summary"]["unit_attribution"]` per prompt. `options` (a, b)
    is one contrast for every prompt; else one continuation per prompt (None: greedy)."""
    from tqdm.auto import tqdm

    targets = list(continuations) if continuations is not None else [None] * len(prompts)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} continuations")
    if out is not None:
        check_target(Path(out), overwrite=overwrite)
    frames, curves, summaries, rows = [], [], [], []
    with tqdm(desc="unit attribution", unit="row", disable=not progress) as bar:
        for i, (prompt, cont) in enumerate(zip(prompts, targets)):
            frame, curve, summary = attribute_units(
                loaded, prompt, config, continuation=cont, options=options, prompt_id=i,
                progress=bar if progress else None)
            frames.append(frame)
            curves += [] if curve is None else [curve]
            rows.append((i, prompt, summary.pop("token_ids"), False))
            summaries.append(summary)
    tables = {**prompt_tables(loaded.tokenizer, rows),
              "unit_attributions": conform("unit_attributions", pd.concat(frames,
                                                                          ignore_index=True))}
    if curves:
        tables["attribution_curves"] = conform("attribution_curves",
                                               pd.concat(curves, ignore_index=True))
    writer = RunWriter(out, model=loaded.model, name=loaded.name, fingerprint=loaded.fingerprint,
                       settings={"analysis": "unit_attribution", "config": asdict(config)},
                       overwrite=overwrite)
    writer.write(0, tables)
    return writer.finish(lambda t: (t, {"summary": {"unit_attribution": summaries}}))
