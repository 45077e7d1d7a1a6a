"""Counterfactual token generation with a Gumbel-max structural causal model (Chatzi et al.).

Definition (README, "Measures"; Chatzi, Benz, Straitouri, Tsirtsis,
Gomez-Rodriguez, "Counterfactual Token Generation in Large Language Models", 2024): sampling
from softmax(z_t / T) is written as a deterministic function of the logits and exogenous noise,

    y_t = argmax_v ( z_t[v] / T + g_t[v] ),   g_t[v] ~ Gumbel(0, 1) iid over v and t,

(the Gumbel-max trick: y_t is distributed as softmax(z_t / T)). A factual generation records
its noise; a counterfactual one intervenes (sets the token at one generation step, or changes
the prompt) and regenerates every later step with the *same* noise g_t, answering "what would
the model have written, had this token been different, all else (the noise) equal?".

Noise storage: the noise is never stored as a (steps, V) tensor. Step t's noise is the t-th
draw of V uniforms from a CPU `torch.Generator` seeded with `Generation.seed`, so
(seed, step) regenerates it exactly on any device; the draws do not depend on the tokens, so an
intervention leaves the noise of every step unchanged. Decoding is incremental with the KV
cache: one forward over the prompt (plus the forced prefix), then one token per step.

Following the authors' code (github.com/Networks-Learning/counterfactual-llms): the samplers
(`GumbelConfig.sampler`, counterfactual_samplers.py) are their `src/sampler.py` "vocabulary",
"top-p token" and "top-k token": the noise is over the whole vocabulary, tied to token ids,
and tokens outside the nucleus / top k are masked after it is added, so top-p and top-k
counterfactuals keep the same noise per token id. The replacement token can be given, or drawn
as their automatic intervention does (`Sampler.intervention`, used by `src/stability.py`:
top-p 0.9 of softmax(z / T) without the factual token, seed 42; `token_id=SAMPLE`). Their
temperatures are 0.6 (`src/single_query.py`) and 0.9 (stories, `scripts/story_query.py`);
tokenprobe's default is 1.0, the model's own distribution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence, Union

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from tokenprobe.analyses.counterfactual_samplers import (  # noqa: F401 (re-exported)
    SAMPLERS, GumbelConfig, gumbel_max, gumbel_noise, replacement_token, sample_token)
from tokenprobe.models import LoadedModel, eos_ids
from tokenprobe.store import Run, RunWriter, check_target, prompt_tables
from tokenprobe.tables import Column, Table, conform, declare
from tokenprobe.tokens import token_text

SAMPLE = "sample"  # the token_id of an intervention whose token `replacement_token` draws

COLUMNS = ["generation_id", "step", "factual_token_id", "factual_token",
           "counterfactual_token_id", "counterfactual_token", "intervened", "differs"]
GENERATION_COLUMNS = ["generation_id", "seed", "temperature", "sampler", "top_p", "top_k",
                      "intervention_step", "intervention_token_id", "replacement", "prompt",
                      "counterfactual_prompt", "factual_text", "counterfactual_text",
                      "first_difference"]

C = Column
declare("counterfactual", {
    "counterfactuals": Table("generation x step (Gumbel-max SCM of Chatzi et al.)",
                             ("generation_id", "step"), {
        "generation_id": C("int64", "key; one factual/counterfactual pair per intervention"),
        "step": C("int64", "key; 0-based generation step (prompt tokens excluded)"),
        "factual_token_id": C("Int64", "the factual sample (NA past its end)"),
        "factual_token": C("string", "its text"),
        "counterfactual_token_id": C("Int64", "the counterfactual one, decoded with the factual "
                                              "Gumbel noise of the same step"),
        "counterfactual_token": C("string", "its text"),
        "intervened": C("bool", "this step's counterfactual token was set by the intervention"),
        "differs": C("bool", "the two tokens differ (or only one generation reaches the "
                             "step)")}),
    "generations": Table("generation", ("generation_id",), {
        "generation_id": C("int64", "key"),
        "seed": C("int64", "seed of the Gumbel noise (the same for factual and counterfactual)"),
        "temperature": C("float64", "sampling temperature T of argmax(z / T + g)"),
        "sampler": C("string", "full, top_p or top_k: the argmax is over the whole "
                               "vocabulary, the nucleus or the k most probable tokens"),
        "top_p": C("float64", "the nucleus mass p of sampler top_p (NA: another sampler)"),
        "top_k": C("Int64", "the k of sampler top_k (NA: another sampler)"),
        "intervention_step": C("Int64", "the intervened step (NA: none)"),
        "intervention_token_id": C("Int64", "the token set there (NA: none)"),
        "replacement": C("string", "given (intervention_token_id chosen by the user) or sampled "
                                   "(Chatzi et al.'s top-p draw without the factual token); NA: "
                                   "no intervention on a token"),
        "prompt": C("string", "the factual prompt"),
        "counterfactual_prompt": C("string", "the intervened prompt (NA: none)"),
        "factual_text": C("string", "the factual generated text (prompt excluded)"),
        "counterfactual_text": C("string", "the counterfactual generated text"),
        "first_difference": C("Int64", "first step whose tokens differ (NA: identical)")}),
})
del C


@dataclass(frozen=True)
class Generation:
    """A generation and what regenerates its noise.

    Attributes:
        prompt_ids: the prompt's token ids.
        token_ids: the generated token ids, step 0 first.
        seed: seed of the CPU generator whose t-th draw is step t's noise (`gumbel_noise`).
        config: the sampling settings used.
        forced: step -> token id set by intervention (steps before an intervention on a token
            are forced to the factual tokens); empty for a factual generation.
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    seed: int
    config: GumbelConfig
    forced: tuple[tuple[int, int], ...] = ()

    def text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The generated text (without the prompt)."""
        return tokenizer.decode(list(self.token_ids))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _decode(loaded: LoadedModel, prompt_ids: Sequence[int], forced: dict[int, int], seed: int,
            config: GumbelConfig) -> list[int]:
    """Generate with Gumbel-max noise from `seed` and `config.sampler`; steps in `forced` take
    the given token.

    The forced steps that form a prefix (0, 1, ..., k) go into the first forward with the
    prompt; every other step is one KV-cached forward of the previous token.
    """
    model, eos = loaded.model, set(eos_ids(loaded.model, loaded.tokenizer))
    prefix = []
    while len(prefix) in forced:
        prefix.append(forced[len(prefix)])
    ids = torch.tensor([list(prompt_ids) + prefix], device=_device(model))  # (1, P + k)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[0, -1], out.past_key_values  # (V,)
    noise = gumbel_noise(seed, logits.shape[-1])
    tokens = []
    for step in range(config.max_new_tokens):
        g = next(noise)  # drawn at every step, used or not, so step t always gets g_t
        if step < len(prefix):
            token = prefix[step]
        else:
            token = forced[step] if step in forced else int(sample_token(logits, g, config))
            if step < config.max_new_tokens - 1:
                out = model(input_ids=torch.tensor([[token]], device=ids.device),
                            past_key_values=cache, use_cache=True)
                logits, cache = out.logits[0, -1], out.past_key_values
        tokens.append(token)
        if config.stop_at_eos and token in eos:
            break
    return tokens


def sample(loaded: LoadedModel, prompt: str | Sequence[int], *, seed: int,
           config: GumbelConfig = GumbelConfig()) -> Generation:
    """A factual generation: Gumbel-max sampling with noise from `seed` (Chatzi et al. 2024).

    Args:
        loaded: a `tokenprobe.load()` result.
        prompt: text (tokenised with the tokenizer's default special tokens) or token ids.
        seed: seed of the noise; the same seed and prompt give the same generation.
        config: temperature, sampler, length and stopping.
    """
    prompt_ids = _prompt_ids(loaded, prompt)
    tokens = _decode(loaded, prompt_ids, {}, seed, config)
    return Generation(tuple(prompt_ids), tuple(tokens), seed, config)


def counterfactual(loaded: LoadedModel, factual: Generation, *, step: int | None = None,
                   token_id: Union[int, Literal["sample"], None] = None,
                   prompt: str | Sequence[int] | None = None) -> Generation:
    """Regenerate `factual` under an intervention, with the same Gumbel noise.

    Interventions (either or both):
    - on a token: the token at generation `step` is set to `token_id`; steps before it keep
      their factual tokens and steps after it are regenerated with their factual noise g_t.
      `token_id=SAMPLE` ("sample") draws the token as Chatzi et al.'s automatic intervention
      does (`replacement_token` on the logits at `step`, under the counterfactual prompt, with
      `factual.config`'s temperature, replacement_top_p and replacement_seed);
    - on the prompt: `prompt` replaces the factual prompt and every step is regenerated with
      its factual noise (Chatzi et al.'s interventions on the input). With a token intervention
      too, the factual tokens before `step` are forced as well.

    With no intervention the result reproduces `factual` token for token.
    """
    if (step is None) != (token_id is None):
        raise ValueError("give both step and token_id for an intervention on a token, or neither")
    if isinstance(token_id, str) and token_id != SAMPLE:
        raise ValueError(f"token_id must be a token id or {SAMPLE!r}, got {token_id!r}")
    prompt_ids = factual.prompt_ids if prompt is None else tuple(_prompt_ids(loaded, prompt))
    forced: dict[int, int] = {}
    if step is not None:
        if not 0 <= step < len(factual.token_ids):
            raise ValueError(f"step {step} is outside the factual generation "
                             f"(0..{len(factual.token_ids) - 1})")
        forced = dict(enumerate(factual.token_ids[:step]))
        if token_id == SAMPLE:
            config = factual.config
            logits = _next_logits(loaded, [*prompt_ids, *factual.token_ids[:step]])
            token_id = replacement_token(logits, factual.token_ids[step],
                                         temperature=config.temperature,
                                         top_p=config.replacement_top_p,
                                         seed=config.replacement_seed)
        forced[step] = int(token_id)
    tokens = _decode(loaded, prompt_ids, forced, factual.seed, factual.config)
    return replace(factual, prompt_ids=tuple(prompt_ids), token_ids=tuple(tokens),
                   forced=tuple(sorted(forced.items())))


@torch.inference_mode()
def _next_logits(loaded: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    """The (V,) next-token logits after `ids`."""
    out = loaded.model(input_ids=torch.tensor([list(ids)], device=_device(loaded.model)),
                       logits_to_keep=1)
    return out.logits[0, -1]


def _prompt_ids(loaded: LoadedModel, prompt: str | Sequence[int]) -> list[int]:
    ids = loaded.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt has no tokens")
    return [int(i) for i in ids]


def compare(tokenizer: PreTrainedTokenizerBase, factual: Generation, counter: Generation, *,
            generation_id: int = 0) -> pd.DataFrame:
    """Factual vs counterfactual tokens, one row per generation step.

    Columns: generation_id; step (0-based generation step); factual_token_id, factual_token;
    counterfactual_token_id, counterfactual_token (null ids / tokens where that generation
    is shorter); intervened (the counterfactual's token at this step was set by the
    intervention, not sampled; the forced factual prefix does not count); differs (the two
    token ids differ, or only one generation reaches this step).
    """
    intervened_step = counter.forced[-1][0] if counter.forced else None
    rows = []
    for step in range(max(len(factual.token_ids), len(counter.token_ids))):
        f = factual.token_ids[step] if step < len(factual.token_ids) else None
        c = counter.token_ids[step] if step < len(counter.token_ids) else None
        rows.append((generation_id, step, f, None if f is None else token_text(tokenizer, f),
                     c, None if c is None else token_text(tokenizer, c),
                     step == intervened_step, f != c))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("factual_token_id", "counterfactual_token_id"):
        frame[col] = frame[col].astype("Int64")
    return frame


@dataclass(frozen=True)
class Intervention:
    """One counterfactual query: on a prompt, sample with `seed`, then intervene.

    Attributes:
        prompt: the factual prompt.
        seed: noise seed of the factual generation.
        step, token_id: the token intervention (both None for none); token_id=SAMPLE draws
            the token (`counterfactual`).
        counterfactual_prompt: the prompt intervention (None for none).
    """

    prompt: str
    seed: int = 0
    step: int | None = None
    token_id: Union[int, Literal["sample"], None] = None
    counterfactual_prompt: str | None = None


def counterfactuals(loaded: LoadedModel, queries: Sequence[Intervention],
                    config: GumbelConfig = GumbelConfig(), *,
                    progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample each query's factual generation, apply its intervention, tabulate both.

    Queries with the same prompt and seed share one factual generation (it is sampled once).

    Args:
        loaded: a `tokenprobe.load()` result.
        queries: the interventions; generation_id = index.
        config: temperature, sampler, length and stopping, shared by all queries.
        progress: a tqdm bar over the queries.

    Returns:
        `steps`: one row per (generation_id, step), columns `COLUMNS` (see `compare`; the
        `counterfactuals` table). `generations`: one row per generation_id, columns
        `GENERATION_COLUMNS` (the `generations` table): seed, temperature, sampler, top_p and
        top_k (null unless that sampler), intervention_step and intervention_token_id (null for
        none; the drawn token for token_id=SAMPLE), replacement ("given", "sampled", null for
        none), prompt, counterfactual_prompt (null for none), factual_text and
        counterfactual_text (the generated text only), first_difference (first step whose
        tokens differ, null if none).
    """
    from tqdm.auto import tqdm

    steps, gens, factuals = [], [], {}
    for gid, q in enumerate(tqdm(queries, desc="counterfactuals", unit="generation",
                                 disable=not progress)):
        if (q.prompt, q.seed) not in factuals:
            factuals[q.prompt, q.seed] = sample(loaded, q.prompt, seed=q.seed, config=config)
        fact = factuals[q.prompt, q.seed]
        if q.step is not None and q.step < 0:  # from the end, as Python indexes
            q = replace(q, step=len(fact.token_ids) + q.step)
        cf = counterfactual(loaded, fact, step=q.step, token_id=q.token_id,
                            prompt=q.counterfactual_prompt)
        table = compare(loaded.tokenizer, fact, cf, generation_id=gid)
        diff = table.step[table.differs]
        token, how = ((None, None) if q.step is None else
                      (cf.forced[-1][1], "sampled" if q.token_id == SAMPLE else "given"))
        gens.append((gid, q.seed, config.temperature, config.sampler, config.top_p,
                     config.top_k, q.step, token, how, q.prompt, q.counterfactual_prompt,
                     fact.text(loaded.tokenizer), cf.text(loaded.tokenizer),
                     int(diff.iat[0]) if len(diff) else None))
        steps.append(table)
    generations = pd.DataFrame(gens, columns=GENERATION_COLUMNS)
    for col in ("top_k", "intervention_step", "intervention_token_id", "first_difference"):
        generations[col] = generations[col].astype("Int64")
    generations["top_p"] = generations["top_p"].astype("float64")
    return pd.concat(steps, ignore_index=True), generations


def counterfactual_run(loaded: LoadedModel, queries: Sequence[Intervention],
                       config: GumbelConfig = GumbelConfig(), *, progress: bool = False,
                       out: str | os.PathLike | None = None, overwrite: bool = False) -> Run:
    """`counterfactuals` as a run: tables `prompts` and `tokens` (each distinct factual prompt,
    prompt_id in order of first use), `counterfactuals` (per step) and `generations`; saved at
    `out` when given (`tokenprobe.store.RunWriter`)."""
    from dataclasses import asdict

    if out is not None:
        check_target(Path(out), overwrite=overwrite)  # a taken --out fails before the work
    steps, generations = counterfactuals(loaded, queries, config, progress=progress)
    writer = RunWriter(out, model=loaded.model, name=loaded.name, fingerprint=loaded.fingerprint,
                       settings={"analysis": "counterfactual", "config": asdict(config),
                                 "queries": [asdict(q) for q in queries]}, overwrite=overwrite)
    texts = list(dict.fromkeys(q.prompt for q in queries))
    writer.write(0, {**prompt_tables(loaded.tokenizer, [(i, text, _prompt_ids(loaded, text), False)
                                                        for i, text in enumerate(texts)]),
                     "counterfactuals": conform("counterfactuals", steps),
                     "generations": conform("generations", generations)})
    return writer.finish()
