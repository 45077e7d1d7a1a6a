"""Critical tokens over a task set: sample a wrong trajectory, roll out its prefixes, save a run.

The method is Lin et al., "Critical Tokens Matter" (cDPO, chenzhiling9954/Critical-Tokens-Matter)
as fixed in README, "Measures"; the rule, pass@k and the prefix schedule are in
`tokenprobe.analyses.critical.rule`, the KV-shared sampler in
`tokenprobe.analyses.critical.sampling`, the tasks in `tokenprobe.analyses.critical.tasks`.
Per task: take the given trajectory, or sample up to `trajectory_attempts` at
`trajectory_temperature` and keep the first incorrect one (tasks with none are reported and
skipped); sample `n_rollouts` continuations at `temperature` of the prefixes the schedule asks
for; at the critical token run the counterfactual check as the authors' code does
(`src/rollout_sampling_for_critical_tokens.py::generate_with_and_without_for_sampling`):
`counterfactual_draws` replacement tokens (64) from the softmax at `counterfactual_temperature`
(1) with the original token's probability set to 0, each rolled out once at `temperature`. Each
summary item says which temperature each stage used. Every sampled prefix is a part of the run
(`tokenprobe.store.RunWriter`), so an interrupted search resumes without sampling completed
prefixes again, and every rollout's seed is derived from the base seed, so the same seed gives
the same tables.

Tables: `prompts`, `tokens` (prompt + trajectory, with `critical_success` and `critical`) and
`rollouts` (every sampled continuation, its verdict and seed); the per-task figures are in
`run.meta["summary"]["critical"]` (`summary_frame(run)`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict

import pandas as pd
from tqdm.auto import tqdm

from tokenprobe.analyses.critical.rule import (CriticalConfig, find_critical, next_prefixes,
                                               pass_at_k, rollout_seed)
from tokenprobe.analyses.critical.sampling import Continuation, Job, sample_jobs
from tokenprobe.analyses.critical.tasks import Task, prompt_ids, stopper
from tokenprobe.models import LoadedModel, eos_ids
from tokenprobe.store import Run, RunWriter, prompt_tables
from tokenprobe.tables import Column, Table, conform, declare

STRIDE = 100_000  # checkpoint index: task * STRIDE + (0 trajectory | 1 + t prefix | one below)
COUNTERFACTUAL, PROMPT_ONLY = STRIDE - 1, STRIDE - 2

C = Column
declare("critical", {
    "tokens": {  # prompt + trajectory rows
        "critical_success": C("float64", "share of the n continuations of the prefix ending at "
                                         "pos that the verifier accepts (NA: prefixes the "
                                         "search skipped, and prompt tokens but the last)"),
        "critical": C("boolean", "the critical token (the search rule, README 'Measures'); "
                                 "at most one per prompt; NA on prompt tokens")},
    "rollouts": Table("prompt x position x kind x rollout (tokenprobe critical, Lin et al.)",
                      ("prompt_id", "pos", "kind", "rollout"), {
        "prompt_id": C("int64", "key"),
        "pos": C("int64", "key: the last token of the prefix continued (kind prefix), the "
                          "resampled token (counterfactual), or the last prompt token "
                          "(trajectory)"),
        "kind": C("string", "prefix / counterfactual / trajectory (a sampled trajectory "
                            "attempt)"),
        "rollout": C("int64", "0-based index of the continuation among its prefix's"),
        "seed": C("int64", "the seed of its draws"),
        "first_token_id": C("Int64", "its first sampled token (counterfactual: the "
                                     "replacement; NA if none)"),
        "n_tokens": C("int64", "sampled tokens"),
        "finish": C("string", "eos / stop (the verifier's answer is complete) / length"),
        "text": C("string", "the continuation's text"),
        "correct": C("bool", "the verifier's verdict on the response (trajectory prefix + "
                             "text)")}),
})
del C


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


def _sample(loaded: LoadedModel, requests: list[tuple[_Scorer, Job]], *, temperature: float,
            max_new_tokens: int, batch_size: int, eos: list[int],
            bar=None) -> list[list[Continuation]]:
    """Continuations per (scorer, job), decoded together (`sample_jobs`).

    Nothing is sampled for a prefix whose answer is already complete (unless its first token is
    to be replaced).
    """
    results: list[list[Continuation]] = [[] for _ in requests]
    jobs, where = [], []
    for k, (scorer, job) in enumerate(requests):
        if (job.ban_first is None and scorer.stop is not None and scorer.response
                and scorer.stop([])):
            results[k] = [Continuation([], "stop", s) for s in job.seeds]
        else:
            jobs.append(job)
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
        conts = _sample(loaded, [(scorer, Job(prompt, seeds, scorer.stop))],
                        temperature=config.trajectory_temperature,
                        max_new_tokens=config.max_trajectory_tokens,
                        batch_size=config.batch_size, eos=eos)[0]
        rollouts = scorer.rows(conts, prompt_id, len(prompt) - 1, "trajectory")
        wrong = [c for c, ok in zip(conts, rollouts.correct) if not ok]
        response = [i for i in wrong[0].ids if i not in eos] if wrong else []
    ids = prompt + response
    tables = prompt_tables(tok, [(prompt_id, tok.decode(prompt), ids, False)])
    if rollouts is not None:
        tables["rollouts"] = rollouts
    return tables


def critical_search(loaded: LoadedModel, tasks: list[Task], config: CriticalConfig | None = None,
                    *, out: str | os.PathLike | None = None, overwrite: bool = False,
                    progress: bool = True,
                    on_prefix: Callable[[int, int], None] | None = None) -> Run:
    """Run the critical-token search (Lin et al.) over `tasks` and return (and save) the run.

    Args:
        loaded: the model (`tokenprobe.load`).
        tasks: verifiable tasks (`tokenprobe.analyses.critical.tasks.load_tasks`).
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
    parts = RunWriter(out, model=loaded.model, name=loaded.name, fingerprint=loaded.fingerprint,
                      settings=_settings(tasks, config), overwrite=overwrite)
    try:  # the writer holds the run's lock until finish; let it go on an error
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
                positions = list(range(len(response) - 1))  # never the whole trajectory
                counts = {t: int(parts.read(i * STRIDE + 1 + t, "rollouts").correct.sum())
                          for t in positions if i * STRIDE + 1 + t in done}
                pbar.set_postfix_str(task.task_id)
                while window := next_prefixes(positions, counts, scan=config.scan,
                                              reset_above=config.reset_above, limit=config.window):
                    scorers = [_Scorer(tok, task, response[:t + 1]) for t in window]
                    requests = [(scorer, Job(prompt + response[:t + 1],
                                             [rollout_seed(config.seed, task.task_id, "prefix",
                                                           t, j)
                                              for j in range(config.n_rollouts)], scorer.stop))
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
                if t == 0 and i * STRIDE + PROMPT_ONLY not in done:  # success before token 0
                    scorer = _Scorer(tok, task, [])
                    seeds = [rollout_seed(config.seed, task.task_id, "prefix", -1, j)
                             for j in range(config.n_rollouts)]
                    conts = _sample(loaded, [(scorer, Job(prompt, seeds, scorer.stop))],
                                    bar=rbar, **sample)[0]
                    parts.write(i * STRIDE + PROMPT_ONLY,
                                {"rollouts": scorer.rows(conts, i, len(prompt) - 1, "prefix")})
                if (config.counterfactual and t is not None
                        and i * STRIDE + COUNTERFACTUAL not in done):
                    # each draw: a replacement at counterfactual_temperature, then one rollout
                    scorer = _Scorer(tok, task, response[:t])
                    seeds = [rollout_seed(config.seed, task.task_id, "counterfactual", t, j)
                             for j in range(config.counterfactual_draws)]
                    job = Job(prompt + response[:t], seeds, scorer.stop, response[t],
                              config.counterfactual_temperature)
                    conts = _sample(loaded, [(scorer, job)], bar=rbar, **sample)[0]
                    rows = scorer.rows(conts, i, len(prompt) + t, "counterfactual")
                    parts.write(i * STRIDE + COUNTERFACTUAL, {"rollouts": rows})
    except BaseException:
        parts.close()
        raise

    def complete(tables: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], dict]:
        tables["tokens"] = add_critical_columns(tables["tokens"], tables.get("rollouts"),
                                                prompt_lens, reset_above=config.reset_above)
        return tables, {"summary": {"critical": summarise(tables, tasks, prompt_lens, config)}}

    return parts.finish(complete)


def _settings(tasks: list[Task], config: CriticalConfig) -> dict:
    return {
        "analysis": "critical",
        "tasks": [{"id": t.task_id, "question": t.question, "answer": t.answer,
                   "trajectory": t.trajectory, "raw": t.raw, "verifier": _describe(t.verifier)}
                  for t in tasks],
        "config": asdict(config), "seed": config.seed,
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
    """Per task: the critical token, success before / at it, pass@k, the counterfactual rate
    and pass@k (`get_pass_at_k` in the authors' code is of the counterfactual rollouts), and the
    temperature of each stage (trajectory: None when given)."""
    tokens, rollouts = tables["tokens"], tables.get("rollouts")
    out = []
    for i, task in enumerate(tasks):
        rows = tokens[tokens.prompt_id == i].set_index("pos")
        n_resp = len(rows) - prompt_lens[i]
        item: dict = {"prompt_id": i, "task_id": task.task_id, "answer": task.answer,
                      "trajectory_tokens": n_resp,
                      "prefixes_sampled": int(rows.critical_success.notna().sum()),
                      "trajectory_temperature": (None if task.trajectory is not None
                                                 else config.trajectory_temperature),
                      "rollout_temperature": config.temperature}
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
        cf = (rollouts[(rollouts.prompt_id == i) & (rollouts.kind == "counterfactual")].correct
              if rollouts is not None else pd.Series(dtype=bool))
        item["counterfactual_success"] = float(cf.mean()) if len(cf) else None
        if len(cf):  # the authors' pass@k (get_pass_at_k) is of these rollouts
            item.update(counterfactual_draws=len(cf),
                        counterfactual_temperature=config.counterfactual_temperature)
            for k in (k for k in config.pass_k if k <= len(cf)):
                item[f"pass_at_{k}_counterfactual"] = pass_at_k(len(cf), int(cf.sum()), k)
        out.append(item)
    return out


def summary_frame(run: Run) -> pd.DataFrame:
    """The per-task figures of a critical run as a DataFrame."""
    return pd.DataFrame(run.meta["summary"]["critical"])
