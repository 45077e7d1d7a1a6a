"""Critical tokens over a task set: sample a wrong trajectory, roll out its prefixes, save a run.

The method is Lin et al., "Critical Tokens Matter" (cDPO, chenzhiling9954/Critical-Tokens-Matter)
as fixed in README, "Measures"; the rule, pass@k and the prefix schedule are in
`tokenprobe.probes.critical`, the KV-shared sampler in `tokenprobe.sampling`. Per task: take
the given trajectory, or sample up to `trajectory_attempts` at `trajectory_temperature` and keep
the first incorrect one (tasks with none are reported and skipped); sample `n_rollouts`
continuations of the prefixes the schedule asks for; at the critical token run the
counterfactual check. Every sampled prefix is a checkpoint (`tokenprobe.store.PartWriter`), so
an interrupted search resumes without sampling completed prefixes again, and every rollout's
seed is derived from the base seed, so the same seed gives the same tables.

Tables: `prompts`, `tokens` (prompt + trajectory, with `critical_success` and `critical`) and
`rollouts` (every sampled continuation, its verdict and seed); the per-task figures are in
`run.meta["summary"]["critical"]` (`summary_frame(run)`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tokenprobe.probes.critical import (
    CriticalConfig,
    find_critical,
    next_prefixes,
    pass_at_k,
    rollout_seed,
)
from tqdm.auto import tqdm

from tokenprobe.models import LoadedModel
from tokenprobe.runner import provenance
from tokenprobe.sampling import Continuation, Job, eos_ids, sample_jobs
from tokenprobe.store import PartWriter, Run
from tokenprobe.tables import conform, merge_parts
from tokenprobe.tasks import Task, prompt_ids, stopper
from tokenprobe.tokens import token_rows

STRIDE = 100_000  # checkpoint index: task * STRIDE + (0 trajectory | 1 + t prefix | one below)
COUNTERFACTUAL, PROMPT_ONLY = STRIDE - 1, STRIDE - 2


@dataclass
class _Parts:
    """Checkpoints of a search: in a `PartWriter`'s staging dir, or in memory."""

    writer: PartWriter | None
    memory: dict[int, dict[str, pd.DataFrame]] = field(default_factory=dict)

    def done(self) -> set[int]:
        return self.writer.done_batches() if self.writer else set(self.memory)

    def write(self, index: int, tables: dict[str, pd.DataFrame]) -> None:
        if self.writer:
            self.writer.write_batch(index, tables)
        else:
            self.memory[index] = tables

    def read(self, index: int, name: str) -> pd.DataFrame:
        if not self.writer:
            return self.memory[index][name]
        return pd.read_parquet(self.writer.staging / "parts" / f"{index:06d}" / f"{name}.parquet")


class _Scorer:
    """Decodes a trajectory prefix + continuation and applies the task's verifier."""

    def __init__(self, tokenizer, task: Task, response: list[int]) -> None:
        self.tokenizer, self.verifier, self.response = tokenizer, task.verifier, response
        done = stopper(task.verifier)
        self.stop = (lambda ids: done(self.text(ids))) if done else None

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(self.response) + list(ids), skip_special_tokens=True)

    def rows(self, conts: list[Continuation], prompt_id: int, pos: int,
             kind: str) -> pd.DataFrame:
        return conform("rollouts", pd.DataFrame({
            "prompt_id": prompt_id, "pos": pos, "kind": kind, "rollout": range(len(conts)),
            "seed": [c.seed for c in conts],
            "first_token_id": pd.array([c.ids[0] if c.ids else None for c in conts], "Int64"),
            "n_tokens": [len(c.ids) for c in conts], "finish": [c.finish for c in conts],
            "text": [self.tokenizer.decode(c.ids, skip_special_tokens=True) for c in conts],
            "correct": [bool(self.verifier(self.text(c.ids))) for c in conts]}))


def _sample(loaded: LoadedModel, requests: list[tuple[_Scorer, list[int], list[int], int | None]],
            *, temperature: float, max_new_tokens: int, batch_size: int, eos: list[int],
            bar=None) -> list[list[Continuation]]:
    """Continuations per (scorer, prefix, seeds, ban_first), decoded together (`sample_jobs`).

    Nothing is sampled for a prefix whose answer is already complete.
    """
    results: list[list[Continuation]] = [[] for _ in requests]
    jobs, where = [], []
    for k, (scorer, prefix, seeds, ban) in enumerate(requests):
        if ban is None and scorer.stop is not None and scorer.response and scorer.stop([]):
            results[k] = [Continuation([], "stop", s) for s in seeds]
        else:
            jobs.append(Job(prefix, seeds, scorer.stop, ban))
            where.append(k)
    conts = sample_jobs(loaded.model, jobs, temperature=temperature,
                        max_new_tokens=max_new_tokens, eos_ids=eos, batch_size=batch_size,
                        on_batch=bar.update if bar is not None else None)
    for k, found in zip(where, conts):
        results[k] = found
    return results


def _trajectory(loaded: LoadedModel, task: Task, prompt_id: int, prompt: list[int],
                config: CriticalConfig, eos: list[int]) -> dict[str, pd.DataFrame]:
    """The task's prompt and incorrect trajectory (empty when there is none) as tables."""
    tok = loaded.tokenizer
    rollouts = None
    if task.trajectory is not None:
        response = list(tok(task.trajectory, add_special_tokens=False)["input_ids"])
        if task.verifier(tok.decode(response, skip_special_tokens=True)):
            response = []
    else:
        scorer = _Scorer(tok, task, [])
        seeds = [rollout_seed(config.seed, task.task_id, "trajectory", -1, a)
                 for a in range(config.trajectory_attempts)]
        conts = _sample(loaded, [(scorer, prompt, seeds, None)],
                        temperature=config.trajectory_temperature,
                        max_new_tokens=config.max_trajectory_tokens,
                        batch_size=config.batch_size, eos=eos)[0]
        rollouts = scorer.rows(conts, prompt_id, len(prompt) - 1, "trajectory")
        wrong = [c for c, ok in zip(conts, rollouts.correct) if not ok]
        response = [i for i in wrong[0].ids if i not in eos] if wrong else []
    ids = prompt + response
    tables = {
        "prompts": conform("prompts", pd.DataFrame({
            "prompt_id": [prompt_id], "text": [tok.decode(prompt)], "n_tokens": [len(ids)]})),
        "tokens": conform("tokens", token_rows(tok, prompt_id, ids)),
    }
    if rollouts is not None:
        tables["rollouts"] = rollouts
    return tables


def critical_search(loaded: LoadedModel, tasks: list[Task], config: CriticalConfig | None = None,
                    *, out: str | Path | None = None, overwrite: bool = False,
                    progress: bool = True,
                    on_prefix: Callable[[int, int], None] | None = None) -> Run:
    """Run the critical-token search (Lin et al.) over `tasks` and return (and save) the run.

    Args:
        loaded: the model (`tokenprobe.load`).
        tasks: verifiable tasks (`tokenprobe.tasks.load_tasks`).
        config: search settings (defaults: `CriticalConfig()`).
        out: run directory; checkpoints go beside it and the same call resumes after an
            interruption. None keeps everything in memory.
        overwrite: replace a complete run at `out`.
        progress: tqdm bars over prefixes and rollouts.
        on_prefix: called with (prompt_id, response index t) after each newly sampled prefix.

    Returns:
        The run: tables `prompts`, `tokens`, `rollouts`; per-task figures in
        `meta["summary"]["critical"]`.
    """
    config = config or CriticalConfig()
    tok, eos = loaded.tokenizer, eos_ids(loaded.model, loaded.tokenizer)
    meta = _metadata(loaded, tasks, config)
    parts = _Parts(PartWriter(Path(out), {k: meta[k] for k in ("model", "weights_fingerprint",
                                                                 "tasks", "config")},
                              overwrite=overwrite) if out is not None else None)
    done = parts.done()
    prompt_lens: dict[int, int] = {}
    sample = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
              "batch_size": config.batch_size, "eos": eos}
    with tqdm(desc="prefixes", unit="prefix", disable=not progress, position=0) as pbar, \
            tqdm(desc="rollouts", unit="rollout", disable=not progress, position=1) as rbar:
        for i, task in enumerate(tasks):
            prompt = prompt_ids(tok, task)
            prompt_lens[i] = len(prompt)
            if i * STRIDE not in done:
                parts.write(i * STRIDE, _trajectory(loaded, task, i, prompt, config, eos))
            response = parts.read(i * STRIDE, "tokens").token_id.tolist()[len(prompt):]
            positions = list(range(len(response)))
            counts = {t: int(parts.read(i * STRIDE + 1 + t, "rollouts").correct.sum())
                      for t in positions if i * STRIDE + 1 + t in done}
            pbar.set_postfix_str(task.task_id)
            while window := next_prefixes(positions, counts, scan=config.scan,
                                          reset_above=config.reset_above, limit=config.window):
                scorers = [_Scorer(tok, task, response[:t + 1]) for t in window]
                requests = [(scorer, prompt + response[:t + 1],
                             [rollout_seed(config.seed, task.task_id, "prefix", t, j)
                              for j in range(config.n_rollouts)], None)
                            for t, scorer in zip(window, scorers)]
                for t, scorer, conts in zip(window, scorers,
                                            _sample(loaded, requests, bar=rbar, **sample)):
                    rows = scorer.rows(conts, i, len(prompt) + t, "prefix")
                    parts.write(i * STRIDE + 1 + t, {"rollouts": rows})
                    counts[t] = int(rows.correct.sum())
                    pbar.update(1)
                    if on_prefix is not None:
                        on_prefix(i, t)
            t = find_critical(counts, reset_above=config.reset_above)
            if t == 0 and i * STRIDE + PROMPT_ONLY not in done:  # success before the first token
                scorer = _Scorer(tok, task, [])
                seeds = [rollout_seed(config.seed, task.task_id, "prefix", -1, j)
                         for j in range(config.n_rollouts)]
                conts = _sample(loaded, [(scorer, prompt, seeds, None)], bar=rbar, **sample)[0]
                parts.write(i * STRIDE + PROMPT_ONLY,
                            {"rollouts": scorer.rows(conts, i, len(prompt) - 1, "prefix")})
            if config.counterfactual and t is not None and i * STRIDE + COUNTERFACTUAL not in done:
                scorer = _Scorer(tok, task, response[:t])
                seeds = [rollout_seed(config.seed, task.task_id, "counterfactual", t, j)
                         for j in range(config.n_rollouts)]
                conts = _sample(loaded, [(scorer, prompt + response[:t], seeds, response[t])],
                                bar=rbar, **sample)[0]
                parts.write(i * STRIDE + COUNTERFACTUAL,
                            {"rollouts": scorer.rows(conts, i, len(prompt) + t, "counterfactual")})

    def complete(tables: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], dict]:
        tables["tokens"] = add_critical_columns(tables["tokens"], tables.get("rollouts"),
                                                prompt_lens, reset_above=config.reset_above)
        return tables, {"critical": summarise(tables, tasks, prompt_lens, config)}

    if parts.writer:
        return parts.writer.finish(meta, complete)
    names = sorted({n for p in parts.memory.values() for n in p})
    tables, summary = complete({n: merge_parts(n, [p.get(n) for p in parts.memory.values()])
                                for n in names})
    return Run(tables, {**meta, "summary": summary, "status": "complete", "tables": names})


def _metadata(loaded: LoadedModel, tasks: list[Task], config: CriticalConfig) -> dict:
    return {
        "model": loaded.name, "weights_fingerprint": loaded.fingerprint,
        "analysis": "critical",
        "tasks": [{"id": t.task_id, "question": t.question, "answer": t.answer,
                   "trajectory": t.trajectory, "raw": t.raw, "verifier": _describe(t.verifier)}
                  for t in tasks],
        "config": asdict(config), "seed": config.seed, **provenance(),
    }


def _describe(verifier) -> str:
    """A stable description (dataclass verifiers print their fields; others their name)."""
    if hasattr(verifier, "__dataclass_fields__"):
        return repr(verifier)
    return getattr(verifier, "__qualname__", type(verifier).__qualname__)


def add_critical_columns(tokens: pd.DataFrame, rollouts: pd.DataFrame | None,
                         prompt_lens: dict[int, int], *, reset_above: int = 3) -> pd.DataFrame:
    """`tokens` with `critical_success` (c_t / n per sampled prefix) and `critical` (the rule's
    position True, other trajectory tokens False, prompt tokens NA)."""
    tokens = tokens.copy()
    key = pd.MultiIndex.from_frame(tokens[["prompt_id", "pos"]])
    stats = pd.DataFrame({"sum": pd.Series(dtype="int64"), "count": pd.Series(dtype="int64")})
    if rollouts is not None and len(rollouts):
        prefix = rollouts[rollouts.kind == "prefix"]
        stats = prefix.groupby(["prompt_id", "pos"]).correct.agg(["sum", "count"])
    success = (stats["sum"] / stats["count"]).astype("float64")
    tokens["critical_success"] = success.reindex(key).to_numpy() if len(stats) else float("nan")
    in_response = tokens.pos >= tokens.prompt_id.map(prompt_lens)
    critical = pd.Series(pd.NA, index=tokens.index, dtype="boolean")
    critical[in_response] = False
    for pid, group in (stats.groupby(level="prompt_id") if len(stats) else []):
        counts = {int(pos): int(c) for (_, pos), c in group["sum"].items()
                  if pos >= prompt_lens[pid]}  # the prompt-only prefix is not a candidate
        pos = find_critical(counts, reset_above=reset_above)
        if pos is not None:
            critical[(tokens.prompt_id == pid) & (tokens.pos == pos)] = True
    tokens["critical"] = critical
    return conform("tokens", tokens)


def summarise(tables: dict[str, pd.DataFrame], tasks: list[Task], prompt_lens: dict[int, int],
              config: CriticalConfig) -> list[dict]:
    """Per task: the critical token, success before / at it, pass@k, the counterfactual rate."""
    tokens, rollouts = tables["tokens"], tables.get("rollouts")
    out = []
    for i, task in enumerate(tasks):
        rows = tokens[tokens.prompt_id == i].set_index("pos")
        n_resp = len(rows) - prompt_lens[i]
        item: dict = {"prompt_id": i, "task_id": task.task_id, "answer": task.answer,
                      "trajectory_tokens": n_resp,
                      "prefixes_sampled": int(rows.critical_success.notna().sum())}
        if n_resp == 0:
            out.append({**item, "status": "no incorrect trajectory"})
            continue
        hit = rows.index[rows.critical.fillna(False).astype(bool)]
        if not len(hit):
            out.append({**item, "status": "no critical token"})
            continue
        pos = int(hit[0])
        before = rows.critical_success.get(pos - 1)
        item.update(status="critical", critical_pos=pos, critical_index=pos - prompt_lens[i],
                    critical_token=str(rows.token[pos]),
                    success_before=None if before is None or pd.isna(before) else float(before),
                    success_at=float(rows.critical_success[pos]))
        n = config.n_rollouts
        for k in (k for k in config.pass_k if k <= n):
            if item["success_before"] is not None:
                item[f"pass_at_{k}_before"] = pass_at_k(n, round(item["success_before"] * n), k)
            item[f"pass_at_{k}_at"] = pass_at_k(n, round(item["success_at"] * n), k)
        if rollouts is not None:
            cf = rollouts[(rollouts.prompt_id == i) & (rollouts.kind == "counterfactual")]
            item["counterfactual_success"] = float(cf.correct.mean()) if len(cf) else None
        out.append(item)
    return out


def summary_frame(run: Run) -> pd.DataFrame:
    """The per-task figures of a critical run as a DataFrame."""
    return pd.DataFrame(run.meta["summary"]["critical"])
