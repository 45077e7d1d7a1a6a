"""The runner: tokenise, batch, forward with hooks, collect per-batch tables, save or return a Run."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tokenprobe.backends import Backend, resolve
from tokenprobe.kernels import selfcheck
from tokenprobe.probe import Batch, Probe, make_probes
from tokenprobe.store import Run, RunWriter, prompt_tables
from tokenprobe.tables import conform, join
from tokenprobe.tokens import encode_prompts, pad_batch


def run(model: Any, prompts: str | Iterable[str], probes: list[str | Probe] | None = None, *,
        tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 8,
        truncate: bool = False, max_tokens: int | None = None,
        out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
        seed: int = 0) -> Run:
    """Run `probes` over `prompts` and return the tables as a `Run`.

    Args:
        model: a `tokenprobe.load()` result, a transformers causal LM (pass `tokenizer`),
            a TransformerLens `TransformerBridge` or an nnsight `LanguageModel`.
        prompts: one text or an iterable of texts; prompt ids are their 0-based order.
        probes: probe names or instances; None runs every registered probe (through
            TransformerBridge or nnsight: every probe that needs no attention statistics).
        tokenizer: overrides the model's tokenizer (required for a bare HF model). A
            TransformerBridge's own tokenizer prepends BOS (TransformerLens' convention); pass
            the HF tokenizer here to keep the model's default special tokens.
        batch_size: prompts per forward pass (prompts are grouped by length, right-padded;
            padding never reaches a table).
        truncate: cut prompts longer than the model's context instead of refusing them.
        max_tokens: keep only the first `max_tokens` tokens of every prompt (e.g. T = 64 for
            Gu et al.'s sink rate); `prompts.n_tokens` records what was kept.
        out: if given, the run is checkpointed per batch into a staging directory beside `out`
            and published atomically at `out` when complete; an interrupted run resumes.
        overwrite: allow replacing a complete run at `out`.
        progress: show a progress bar over prompts.
        seed: torch seed set before the run and recorded in the metadata.

    Raises:
        ValueError: no prompts, `batch_size` < 1 or `max_tokens` < 1 (checked first).
        tokenprobe.tokens.PromptError: an empty prompt, or one longer than the context.
        tokenprobe.store.RunExistsError: `out` holds a complete run and not `overwrite`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (None keeps whole prompts), got {max_tokens}")
    backend = resolve(model, tokenizer)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("no prompts given")
    probe_list = make_probes(probes, sites=backend.sites if probes is None else None)
    backend.check({p.name: set(p.sites) for p in probe_list})
    attention_request(probe_list)  # probes that disagree fail before the first batch
    for probe in probe_list:
        probe.bind(backend.hf_model, backend.tokenizer)
    encoded = encode_prompts(backend.tokenizer, texts, context_length=backend.context_length,
                             truncate=truncate, max_tokens=max_tokens)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))  # less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    settings = {"probes": [p.describe() for p in probe_list],
                "prompts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
                "batch_size": batch_size, "truncate": truncate, "max_tokens": max_tokens,
                "seed": seed}
    writer = RunWriter(out, model=backend.hf_model, name=backend.model_name,
                       fingerprint=backend.fingerprint, settings=settings,
                       meta={"backend": backend.kind, "n_prompts": len(texts)},
                       overwrite=overwrite)
    done = writer.done()
    selfcheck.reset_ran()  # run.json's "kernels": what this process's batches ran
    torch.manual_seed(seed)
    with tqdm(total=len(texts), desc="prompts", unit="prompt", disable=not progress) as bar:
        for index, members in enumerate(batches):
            if index not in done:
                writer.write(index, _run_batch(backend, probe_list, members, texts, encoded))
            bar.update(len(members))

    def complete(tables: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], dict]:
        for probe in probe_list:
            tables = {n: conform(n, t) for n, t in probe.finalize(tables).items()}
        summaries = {p.name: p.summary(tables) for p in probe_list}
        return tables, {"summary": {name: figures for name, figures in summaries.items()
                                    if figures},
                        "warnings": nonfinite_warnings(tables, writer.meta["dtype"]),
                        "kernels": selfcheck.ran()}

    return writer.finish(complete)


def attention_request(probes: list[Probe]) -> dict | None:
    """What the `attention` site computes for `probes` (k_pos, impl, block), or None when no
    probe hooks it; ValueError when two probes ask for different statistics."""
    asked = {p.name: p.attention_options() for p in probes if "attention" in p.sites}
    distinct = {tuple(sorted(o.items())) for o in asked.values()}
    if len(distinct) > 1:
        raise ValueError(f"probes {', '.join(asked)} ask for different attention statistics "
                         f"({asked}); run them separately")
    return next(iter(asked.values()), None)


def _dispatch(probes: list[Probe]) -> Callable[[str, int, Any], None]:
    """The `observe` the backend calls in its hooks: each probe on the sites it hooks."""
    def observe(site: str, layer: int, tensor: Any) -> None:
        for probe in probes:
            if site in probe.sites:
                probe.observe(site, layer, tensor)

    return observe


@torch.inference_mode()  # the forward and every probe's collect (kernels on the model's weights)
def _run_batch(backend: Backend, probes: list[Probe], members: list[int], texts: list[str],
               encoded: list[tuple[list[int], bool]]) -> dict[str, pd.DataFrame]:
    rows = [encoded[i][0] for i in members]
    pad_id = backend.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (backend.tokenizer.eos_token_id or 0)
    input_ids, mask = pad_batch(rows, pad_id, backend.device)
    tables = prompt_tables(backend.tokenizer, [(i, texts[i], *encoded[i]) for i in members])
    token_texts = [tables["tokens"].token[tables["tokens"].prompt_id == i].tolist() for i in members]
    batch = Batch(members, input_ids, mask, [len(r) for r in rows], token_texts,
                  backend.n_layers)
    for probe in probes:
        probe.begin(batch)
    for index in range(max(p.passes for p in probes)):
        active = [p for p in probes if p.passes > index]
        for probe in active:
            probe.begin_pass(index)
        backend.forward(input_ids, mask, _dispatch(active), attention_request(active))
    for probe in probes:
        for name, frame in probe.collect().items():
            tables[name] = join(name, tables.get(name), conform(name, frame))
    return tables


def nonfinite_warnings(tables: dict[str, pd.DataFrame], dtype: str) -> list[str]:
    """The run's warnings: one sentence when any probe found NaN or inf (table `nonfinite`),
    naming the first prompt and layer and what to do about it."""
    found = tables.get("nonfinite")
    if found is None or found.empty:
        return []
    first = found.sort_values(["prompt_id", "layer"]).iloc[0]
    unit = "heads" if first.site == "attention" else "positions"
    remedy = ("float16 overflows past 65504: run in bfloat16 or float32 (--dtype)"
              if dtype == "float16" else
              "look for NaN or inf in the model's weights or inputs, or run in float32")
    return [f"non-finite values (NaN or inf) in {found.prompt_id.nunique()} of "
            f"{len(tables['prompts'])} prompt(s), first in prompt {first.prompt_id} at layer "
            f"{first.layer} ({first.probe} probe, {first.site}: {first.n_nonfinite} of "
            f"{first.n_checked} {unit}); {remedy}. The values stay NaN/inf in the tables, "
            "summaries leave those prompts out, and table `nonfinite` lists every place."]
