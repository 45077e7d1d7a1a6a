"""The runner: read prompts in windows, tokenise, batch, forward with hooks, write a part per
window, add the run-level columns and publish the run (or return it)."""
from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tokenprobe.backends import Backend, resolve
from tokenprobe.kernels import selfcheck
from tokenprobe.probe import Batch, Probe, make_probes
from tokenprobe.store import PartsSQL, Run, RunWriter, prompt_tables
from tokenprobe.tables import conform, join, merge_parts
from tokenprobe.tokens import encode_scored, pad_batch, render

WINDOW = 256  # prompts per part: sorted by length within it, checkpointed when it is done


def run(model: Any, prompts: Any, probes: list[str | Probe] | None = None, *,
        tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 8,
        window: int = WINDOW, truncate: bool = False, max_tokens: int | None = None,
        out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
        seed: int = 0) -> Run:
    """Run `probes` over `prompts` and return the tables as a `Run`.

    Prompts are read lazily, `window` at a time: each window is tokenised, sorted by length
    into batches, run, and written as one part of every table, so memory stays that of one
    window whatever the corpus' size.

    Args:
        model: a `tokenprobe.load()` result, a transformers causal LM (pass `tokenizer`),
            a TransformerLens `TransformerBridge` or an nnsight `LanguageModel`.
        prompts: one text, a list of texts, an iterable of texts (read as it goes), or a
            `tokenprobe.corpus.Corpus` (files, directories, datasets; with `doc_id`s);
            prompt ids are their 0-based order in the corpus.
        probes: probe names or instances; None runs every registered probe (through
            TransformerBridge or nnsight: every probe that needs no attention statistics).
        tokenizer: overrides the model's tokenizer (required for a bare HF model). A
            TransformerBridge's own tokenizer prepends BOS (TransformerLens' convention); pass
            the HF tokenizer here to keep the model's default special tokens.
        batch_size: prompts per forward pass (grouped by length within a window,
            right-padded; padding never reaches a table).
        window: prompts per part: the unit of sorting, checkpointing and resume.
        truncate: cut prompts longer than the model's context instead of refusing them.
        max_tokens: keep only the first `max_tokens` tokens of every prompt (e.g. T = 64 for
            Gu et al.'s sink rate); `prompts.n_tokens` records what was kept.
        out: if given, the run is checkpointed per window into a staging directory beside
            `out` and published atomically at `out` when complete; an interrupted run resumes.
        overwrite: allow replacing a complete run at `out`.
        progress: show a progress bar over prompts.
        seed: torch seed set before the run and recorded in the metadata.

    Raises:
        ValueError: no prompts, `batch_size`, `window` or `max_tokens` < 1 (checked first).
        tokenprobe.tokens.PromptError: an empty prompt, or one longer than the context (when
            its window is reached).
        tokenprobe.store.RunExistsError: `out` holds a complete run and not `overwrite`.
        tokenprobe.store.RunLockedError: another process is writing `out`.
        FileExistsError: `out` has a staged run of other settings or other prompts.
    """
    check_options(batch_size, window, max_tokens)
    stream, described, total = prompt_stream(prompts)
    backend = resolve(model, tokenizer)
    probe_list = bound_probes(backend, probes)
    settings = run_settings(probe_list, described, batch_size=batch_size, window=window,
                            truncate=truncate, max_tokens=max_tokens, seed=seed)
    options = window_options(described, batch_size=batch_size, truncate=truncate,
                             max_tokens=max_tokens)
    with RunWriter(out, **writer_model(backend), settings=settings,
                   overwrite=overwrite) as writer:
        done, digests = writer.done(), []
        selfcheck.reset_ran()  # run.json's "kernels": what this process's batches ran
        torch.manual_seed(seed)
        with tqdm(total=total, desc="prompts", unit="prompt", disable=not progress) as bar:
            for index, part in enumerate(windows(stream(), window)):
                digests.append(prompts_digest(part))
                if index in done:
                    check_resumed(writer, index, digests[-1])
                else:
                    writer.write(index, run_window(backend, probe_list, part, **options),
                                 mark={"prompts_sha256": digests[-1], "n_prompts": len(part)})
                bar.update(len(part))
        check_no_extra_parts(writer, done, len(digests))
        return finish(writer, probe_list, digests)


def check_options(batch_size: int, window: int, max_tokens: int | None) -> None:
    """`run`'s first check: ValueError when `batch_size`, `window` or `max_tokens` < 1."""
    for name, value in (("batch_size", batch_size), ("window", window)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (None keeps whole prompts), got {max_tokens}")


def bound_probes(backend: Backend, probes: list[str | Probe] | None) -> list[Probe]:
    """The probes `run` runs through `backend` (None: every probe its sites allow), checked
    against its sites and each other and bound to its model."""
    probe_list = make_probes(probes, sites=backend.sites if probes is None else None)
    backend.check({p.name: set(p.sites) for p in probe_list})
    attention_request(probe_list)  # probes that disagree fail before the first batch
    for probe in probe_list:
        probe.bind(backend.hf_model, backend.tokenizer)
    return probe_list


def writer_model(backend: Backend) -> dict:
    """`RunWriter`'s keywords for the model `backend` runs: model, name, fingerprint, meta."""
    return {"model": backend.hf_model, "name": backend.model_name,
            "fingerprint": backend.fingerprint, "meta": {"backend": backend.kind}}


def run_settings(probes: list[Probe] | list[dict], described: dict, *, batch_size: int,
                 window: int, truncate: bool, max_tokens: int | None, seed: int) -> dict:
    """What identifies a run for resume (run.json): the probes (instances, or their
    `describe()`), the corpus (`prompt_stream`'s description) and the run options."""
    return {"probes": [p if isinstance(p, dict) else p.describe() for p in probes],
            "corpus": described, "batch_size": batch_size, "window": window,
            "truncate": truncate, "max_tokens": max_tokens, "seed": seed}


def window_options(described: dict, *, batch_size: int, truncate: bool,
                   max_tokens: int | None) -> dict:
    """`run_window`'s keyword arguments for a corpus described as `described`."""
    return {"batch_size": batch_size, "truncate": truncate, "max_tokens": max_tokens,
            "doc_ids": bool(described.get("sources"))}


def prompt_stream(prompts: Any) -> tuple[Callable[[], Iterator], dict, int | None]:
    """(a function giving the prompts in order, what identifies them for resume, their count
    when known) of what `run` accepts; ValueError when there are none."""
    from tokenprobe.corpus import Corpus, Prompt

    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Corpus):
        return prompts.__iter__, prompts.describe(), None
    if isinstance(prompts, Sequence):
        corpus = Corpus(texts=list(prompts))
        return corpus.__iter__, corpus.describe(), len(prompts)
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a text, texts or a Corpus, got {type(prompts)}")
    texts = iter(prompts)  # read once, as it goes: resume checks each part's prompts
    return lambda: (Prompt(i, text, None) for i, text in enumerate(texts)), {"stream": True}, None


def windows(prompts: Iterable, size: int) -> Iterator[list]:
    """`prompts` in consecutive lists of `size` (the last may be shorter)."""
    iterator = iter(prompts)
    while part := list(itertools.islice(iterator, size)):
        yield part


def prompts_digest(part: list) -> str:
    """sha256 of a window's texts, each length-prefixed (["p\\x00q"] is not ["p", "q"]), and
    of the responses and chat messages of the prompts that have them."""
    digest = hashlib.sha256()
    for prompt in part:
        pieces = [prompt.text]
        if prompt.response is not None or prompt.messages is not None:
            pieces += ["\x00response", prompt.response or "",
                       *(f"{role}\x00{content}" for role, content in prompt.messages or ())]
        for piece in pieces:
            data = piece.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def check_resumed(writer: RunWriter, index: int, digest: str) -> None:
    if writer.mark(index).get("prompts_sha256") != digest:
        raise FileExistsError(
            f"part {index} of the run staged at {writer.staging} was written from other "
            "prompts than these (the corpus changed since); run with the same prompts to "
            "resume it, or delete that directory, or choose another --out")


def check_no_extra_parts(writer: RunWriter, done: set[int], n_parts: int) -> None:
    extra = sorted(i for i in done if i >= n_parts)
    if n_parts == 0:
        raise ValueError("no prompts given")
    if extra:
        raise FileExistsError(
            f"the run staged at {writer.staging} has {len(extra)} part(s) past the end of these "
            "prompts (the corpus is shorter than when it was started); run with the same "
            "prompts to resume it, or delete that directory, or choose another --out")


def finish(writer: RunWriter, probes: list[Probe], digests: list[str],
           kernels: dict | None = None) -> Run:
    """Publish the run: each probe's run-level statistics and columns, part by part, then the
    summaries, warnings and what identifies the prompts, in run.json. `kernels` is run.json's
    "kernels" (default: what this process's batches ran, `selfcheck.ran()`)."""
    rewrites = tuple(dict.fromkeys(t for p in probes for t in p.finalizes))

    def statistics(sql: PartsSQL) -> dict:
        return {p.name: p.statistics(sql) for p in probes}

    def finalize(tables: dict[str, pd.DataFrame], stats: dict) -> dict[str, pd.DataFrame]:
        for probe in probes:
            if probe.finalizes:
                tables = {**tables, **probe.finalize(
                    {n: tables[n] for n in probe.finalizes if n in tables}, stats[probe.name])}
        return tables

    def summarize(sql: PartsSQL, stats: dict) -> dict:
        summaries = {p.name: p.summary(sql, stats[p.name]) for p in probes}
        diagnostics = {p.name: p.diagnostics(sql, stats[p.name], writer.meta) for p in probes}
        n_prompts = int(sql.sql("SELECT count(*) AS n FROM prompts").n.iloc[0])
        return {"n_prompts": n_prompts,
                "prompts_sha256": hashlib.sha256("".join(digests).encode()).hexdigest(),
                "summary": {name: figures for name, figures in summaries.items() if figures},
                "diagnostics": {name: found for name, found in diagnostics.items() if found},
                "warnings": nonfinite_warnings(sql, writer.meta["dtype"], n_prompts),
                "kernels": selfcheck.ran() if kernels is None else kernels}

    return writer.finish(statistics=statistics, finalize=finalize, rewrites=rewrites,
                         summarize=summarize)


def attention_request(probes: list[Probe]) -> dict | None:
    """What the `attention` site computes for `probes` (k_pos, impl, block), or None when no
    probe hooks it; ValueError when two probes ask for different statistics."""
    asked = {p.name: p.attention_options() for p in probes if "attention" in p.sites}
    distinct = {tuple(sorted(o.items())) for o in asked.values()}
    if len(distinct) > 1:
        raise ValueError(f"probes {', '.join(asked)} ask for different attention statistics "
                         f"({asked}); run them separately")
    return next(iter(asked.values()), None)


def run_window(backend: Backend, probes: list[Probe], part: list, *, batch_size: int,
               truncate: bool, max_tokens: int | None, doc_ids: bool = False
               ) -> dict[str, pd.DataFrame]:
    """The tables of one window of prompts (`tokenprobe.corpus.Prompt`s): tokenised, sorted by
    length into batches of `batch_size`, run, and each table sorted by its keys; `doc_ids`
    adds column `prompts.doc_id` (a corpus read from files)."""
    rendered = [render(backend.tokenizer, p) for p in part]  # chat templates applied once
    encoded = encode_scored(backend.tokenizer, part, context_length=backend.context_length,
                            truncate=truncate, max_tokens=max_tokens, rendered=rendered)
    texts = [text + (response or "") for text, response, _ in rendered]  # prompts.text
    order = sorted(range(len(part)), key=lambda i: len(encoded[i][0]))  # less padding
    batches = []
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        batches.append(_run_batch(backend, probes, [part[i] for i in members],
                                  [texts[i] for i in members], [encoded[i] for i in members],
                                  doc_ids))
    names = list(dict.fromkeys(n for tables in batches for n in tables))
    return {n: merge_parts(n, [tables.get(n) for tables in batches]) for n in names}


def _dispatch(probes: list[Probe]) -> Callable[[str, int, Any], None]:
    """The `observe` the backend calls in its hooks: each probe on the sites it hooks."""
    def observe(site: str, layer: int, tensor: Any) -> None:
        for probe in probes:
            if site in probe.sites:
                probe.observe(site, layer, tensor)

    return observe


@torch.inference_mode()  # the forward and every probe's collect (kernels on the model's weights)
def _run_batch(backend: Backend, probes: list[Probe], members: list, texts: list[str],
               encoded: list[tuple[list[int], bool, int | None]], with_ids: bool
               ) -> dict[str, pd.DataFrame]:
    rows = [ids for ids, *_ in encoded]
    pad_id = backend.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (backend.tokenizer.eos_token_id or 0)
    input_ids, mask = pad_batch(rows, pad_id, backend.device)
    tables = prompt_tables(backend.tokenizer,
                           [(p.prompt_id, text, *e) for p, text, e in zip(members, texts, encoded)],
                           [p.doc_id for p in members] if with_ids else None)
    tokens = tables["tokens"]
    token_texts = [tokens.token[tokens.prompt_id == p.prompt_id].tolist() for p in members]
    batch = Batch([p.prompt_id for p in members], input_ids, mask, [len(r) for r in rows],
                  token_texts, backend.n_layers)
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


def nonfinite_warnings(sql: PartsSQL, dtype: str, n_prompts: int) -> list[str]:
    """The run's warnings: one sentence when any probe found NaN or inf (table `nonfinite`),
    naming the first prompt and layer and what to do about it."""
    if not sql.columns("nonfinite"):
        return []
    found = sql.sql("SELECT *, count(DISTINCT prompt_id) OVER () AS n_bad FROM nonfinite "
                    "ORDER BY prompt_id, layer LIMIT 1")
    if found.empty:
        return []
    first = found.iloc[0]
    unit = "heads" if first.site == "attention" else "positions"
    remedy = ("float16 overflows past 65504: run in bfloat16 or float32 (--dtype)"
              if dtype == "float16" else
              "look for NaN or inf in the model's weights or inputs, or run in float32")
    return [f"non-finite values (NaN or inf) in {first.n_bad} of {n_prompts} prompt(s), first "
            f"in prompt {first.prompt_id} at layer {first.layer} ({first.probe} probe, "
            f"{first.site}: {first.n_nonfinite} of {first.n_checked} {unit}); {remedy}. The "
            "values stay NaN/inf in the tables, summaries leave those prompts out, and table "
            "`nonfinite` lists every place."]
