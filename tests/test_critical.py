"""Critical-token search: the rule, pass@k, the schedule, bookkeeping, seeds, resume, the CLI."""
from __future__ import annotations

import itertools
import json
import random

import pandas as pd
import pytest
import torch

from tokenprobe.analyses.critical import (CriticalConfig, Task, critical_search, find_critical,
                                          next_prefix, next_prefixes, pass_at_k,
                                          sample_continuations, summary_frame)
from tokenprobe.cli.main import main
from tokenprobe.store import open_run
from tokenprobe.tables import SCHEMAS

TRAJECTORY = "abcdefgh"  # tiny-llama is byte-level: one token per character


class NoABCD:
    """Correct unless the response starts with 'abcd'; an answer is complete at its first
    character outside a-h. So prefixes 'a', 'ab' are always correct, 'abc' almost always
    (only a continuation starting with 'd' fails), and every prefix from 'abcd' on is never
    correct: the critical token is 'd', response index 3, by construction."""

    def __call__(self, text: str) -> bool:
        return not text.startswith("abcd")

    def done(self, text: str) -> bool:
        return any(ch not in TRAJECTORY for ch in text)


def _task() -> Task:
    return Task("abcd", "Q: ", NoABCD(), trajectory=TRAJECTORY, raw=True)


def _config(**kw) -> CriticalConfig:
    return CriticalConfig(**{"n_rollouts": 8, "batch_size": 4, "max_new_tokens": 4, **kw})


def test_search_rule_on_hand_made_counts():
    assert find_critical({0: 5, 1: 0, 2: 2, 3: 0}) == 1
    assert find_critical({0: 0, 1: 4, 2: 0, 3: 1}) == 2  # 4 > 3 resets
    assert find_critical({0: 0, 1: 3, 2: 0}) == 0  # 3 does not
    assert find_critical({0: 0, 1: 5}) == 0  # no candidate left: the one the reset cleared
    assert find_critical(dict(enumerate([5, 0, 2, 4, 1, 1]))) == 1
    assert find_critical(dict(enumerate([0, 9, 0, 9, 2]))) == 2  # the last one cleared
    assert find_critical({0: 1, 1: 2}) is None
    assert find_critical({}) is None
    assert find_critical({4: 0, 9: 0, 2: 7}) == 4  # positions are sorted
    assert find_critical({0: 0, 1: 2}, reset_above=1) == 0


def authors_rule(counts: list[int], reset_above: int = 3) -> int | None:
    """Critical-Tokens-Matter's analyse_all_token loop (rollout_sampling_for_critical_tokens.py)
    on per-prefix correct counts, prefixes in increasing length."""
    min_prefix, last_min_prefix, has_find = None, None, False
    for pos, correct in enumerate(counts):
        if correct == 0 and not has_find:
            min_prefix, has_find = pos, True
        if has_find and correct > reset_above:
            last_min_prefix, min_prefix, has_find = min_prefix, None, False
    return min_prefix if has_find else last_min_prefix


def searches(n_vectors: int, seed: int = 0) -> list[list[int]]:
    """Count vectors shaped like real searches: n = 64 rollouts per prefix, the success rate
    decaying along the trajectory with noise, sometimes recovering."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_vectors):
        length, rate = rng.randint(2, 40), rng.random()
        counts = []
        for _ in range(length):
            rate = min(1.0, max(0.0, rate * rng.uniform(0.6, 1.05) + rng.gauss(0, 0.05)))
            counts.append(sum(rng.random() < rate for _ in range(64)))
        out.append(counts)
    return out


def test_the_rule_is_the_authors_on_hand_made_and_search_shaped_counts():
    differ = 0
    for counts in searches(2000):
        old = authors_rule(counts)
        assert find_critical(dict(enumerate(counts))) == old
        live = None  # the rule without the authors' fallback (tokenprobe's before)
        for pos, correct in enumerate(counts):
            live = pos if correct == 0 and live is None else None if correct > 3 else live
        differ += live != old
    assert differ > 0  # the fallback matters on such counts


def test_backward_schedule_gives_the_full_rule_and_skips_prefixes():
    rng = random.Random(0)
    skipped = 0
    for _ in range(500):
        full = [rng.choice([0, 0, 1, 2, 3, 4, 8]) for _ in range(rng.randint(1, 12))]
        positions, counts = list(range(len(full))), {}
        while (t := next_prefix(positions, counts)) is not None:
            counts[t] = full[t]
        assert find_critical(counts) == find_critical(dict(enumerate(full)))
        skipped += len(full) - len(counts)
        assert next_prefix(positions, {}, scan="all") == 0
        window, together = rng.randint(2, 5), {}
        while found := next_prefixes(positions, together, limit=window):
            assert len(found) <= window and found == sorted(found, reverse=True)
            together.update((t, full[t]) for t in found)
        assert find_critical(together) == find_critical(counts)
        assert set(counts) <= set(together) and len(together) - len(counts) < window
    assert skipped > 0


def test_pass_at_k_against_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))  # items < c are correct
                hit = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


@pytest.mark.parametrize("scan, window", [("backward", 1), ("backward", 3), ("backward", 4),
                                          ("all", 4)])
def test_critical_token_found_by_construction(tiny_llama, scan, window):
    run = critical_search(tiny_llama, [_task()], _config(scan=scan, window=window),
                          progress=False)
    tokens, rollouts = run.tokens, run.rollouts
    assert list(tokens.columns) == [c for c in SCHEMAS["tokens"] if c in tokens.columns]
    assert "".join(tokens.token) == "Q: " + TRAJECTORY
    response = tokens[tokens.pos >= 3].set_index("pos")
    assert response.critical.tolist() == [False, False, False, True, False, False, False, False]
    assert tokens[tokens.pos < 3].critical.isna().all()
    success = response.critical_success
    assert (success.loc[6:9] == 0).all() and success[5] > 0.5  # 'abc' then 'd' at pos 6
    assert pd.isna(success[10])  # the whole trajectory is never a prefix (as the authors')
    if scan == "backward" and window == 1:  # 'abc' ends the scan: 'a', 'ab' never sampled
        assert success.loc[3:4].isna().all()
    elif scan == "backward" and window == 3:  # windows 'abcdefg'..'abcde', 'abcd'..'ab'
        assert pd.isna(success[3]) and success[4] == 1
    else:
        assert (success.loc[3:4] == 1).all()
    prefix = rollouts[rollouts.kind == "prefix"]
    assert prefix.groupby("pos").size().eq(8).all()
    cf = rollouts[rollouts.kind == "counterfactual"]
    assert len(cf) == 64 and (cf.pos == 6).all() and cf.correct.all()  # the authors' 64 draws
    assert (cf.first_token_id != tokens.token_id[6]).all()
    item = summary_frame(run).iloc[0]
    assert item.status == "critical" and item.critical_index == 3 and item.critical_token == "d"
    assert item.success_at == 0 and item.success_before == success[5]
    assert item.counterfactual_success == 1.0 and item.pass_at_1_counterfactual == 1.0
    assert item.counterfactual_draws == 64 and item.counterfactual_temperature == 1.0
    assert item.rollout_temperature == 0.5 and pd.isna(item.trajectory_temperature)  # given


def authors_replacements(logits: torch.Tensor, original: int, uniforms: list[float], *,
                         temperature: float = 1.0) -> list[int]:
    """Critical-Tokens-Matter's counterfactual draw (src/rollout_sampling_for_critical_tokens.py,
    generate_with_and_without_for_sampling): probs = F.softmax(logits) (temperature 1), the
    original token's probability set to 0, then torch.multinomial, which renormalises. Here by
    inverse CDF at the given uniforms (tokenprobe's way of drawing), so draws compare one by
    one; `temperature` only to show that the draws tell temperatures apart."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs[original] = 0
    cdf = (probs / probs.sum()).cumsum(-1)
    return [min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64) * cdf[-1],
                                       right=True)), len(cdf) - 1) for u in uniforms]


def _uniforms(seeds, steps: int) -> list[list[float]]:
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return [[float(torch.rand((), generator=g, dtype=torch.float64)) for _ in range(steps)]
            for g in gens]


def test_counterfactual_is_the_authors_temperature_one_draw_then_one_rollout(tiny_llama):
    config = _config(scan="all")
    run = critical_search(tiny_llama, [_task()], config, progress=False)
    ids = run.tokens.token_id.tolist()
    cf = run.rollouts[run.rollouts.kind == "counterfactual"]
    assert len(cf) == config.counterfactual_draws == 64 and (cf.pos == 6).all()
    with torch.inference_mode():
        logits = tiny_llama.model(input_ids=torch.tensor([ids[:6]])).logits[0, -1]
    first = [u for u, _ in _uniforms(cf.seed, 2)]
    want = authors_replacements(logits, ids[6], first)
    assert cf.first_token_id.tolist() == want
    assert want != authors_replacements(logits, ids[6], first, temperature=config.temperature)
    # each replacement is then rolled out once at the rollout temperature (their
    # without_sampling_n = 1 at sampling_config["temperature"]): the second token
    conts = sample_continuations(tiny_llama.model, ids[:6], cf.seed.tolist(),
                                 temperature=config.temperature, max_new_tokens=2,
                                 ban_first=ids[6], first_temperature=1.0)
    assert [c.ids[0] for c in conts] == want
    with torch.inference_mode():
        for cont, (_, u) in zip(conts, _uniforms(cf.seed, 2)):
            step = tiny_llama.model(input_ids=torch.tensor([ids[:6] + cont.ids[:1]])).logits
            probs = torch.softmax(step[0, -1].double() / config.temperature, dim=-1)
            cdf = probs.cumsum(-1)
            assert cont.ids[1] == int(torch.searchsorted(
                cdf, torch.tensor([u], dtype=torch.float64) * cdf[-1], right=True))


def test_sampled_trajectory_and_seeds(tiny_llama):
    task = Task("never", "x", lambda text: False, raw=True)
    config = _config(trajectory_attempts=3, max_trajectory_tokens=5, counterfactual=False)
    a = critical_search(tiny_llama, [task, _task()], config, progress=False)
    b = critical_search(tiny_llama, [task, _task()], config, progress=False)
    for name in ("prompts", "tokens", "rollouts"):
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    traj = a.rollouts[a.rollouts.kind == "trajectory"]
    assert len(traj) == 3 and traj.seed.nunique() == 3 and not traj.correct.any()
    summary = summary_frame(a)
    assert summary.critical_index.tolist() == [0, 3]
    assert summary.trajectory_temperature[0] == 0.7 and pd.isna(summary.trajectory_temperature[1])
    assert summary.success_before[0] == 0  # the prompt alone, sampled because t = 0
    prompt_only = a.tokens[(a.tokens.prompt_id == 0) & a.tokens.critical_success.notna()]
    assert prompt_only.pos.min() == len("x") - 1 and pd.isna(prompt_only.critical.iloc[0])
    c = critical_search(tiny_llama, [task], _config(seed=1, trajectory_attempts=3,
                                                    max_trajectory_tokens=5), progress=False)
    assert set(c.rollouts.seed).isdisjoint(a.rollouts.seed)


class Stop(Exception):
    pass


def test_resume_samples_only_the_remaining_prefixes(tiny_llama, tmp_path):
    tasks, config = [_task(), Task("two", "Q: ", NoABCD(), trajectory="abcdxy", raw=True)], \
        _config(scan="all")
    first: list[tuple[int, int]] = []

    def interrupt(prompt_id: int, t: int) -> None:
        first.append((prompt_id, t))
        if len(first) == 5:
            raise Stop

    with pytest.raises(Stop):
        critical_search(tiny_llama, tasks, config, out=tmp_path / "run", progress=False,
                        on_prefix=interrupt)
    second: list[tuple[int, int]] = []
    resumed = critical_search(tiny_llama, tasks, config, out=tmp_path / "run", progress=False,
                              on_prefix=lambda i, t: second.append((i, t)))
    whole: list[tuple[int, int]] = []
    fresh = critical_search(tiny_llama, tasks, config, progress=False,
                            on_prefix=lambda i, t: whole.append((i, t)))
    assert set(first).isdisjoint(second) and sorted(first + second) == sorted(whole)
    assert len(whole) == 7 + 5  # every prefix but each whole trajectory
    for name in ("prompts", "tokens", "rollouts"):
        pd.testing.assert_frame_equal(resumed.tables[name], fresh.tables[name])
    assert summary_frame(resumed).equals(summary_frame(fresh))


def test_cli(tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": "t1", "question": "1 + 2 = ", "answer": "3",
                                 "trajectory": "The answer is 4. ", "raw": True}) + "\n")
    args = ["critical", "--model", "tiny-llama", "--task", str(tasks), "--rollouts", "4",
            "--max-new-tokens", "3", "--counterfactual-draws", "5", "--quiet",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "t1" in out and "n = 4 rollouts" in out
    assert ("temperatures: prefix rollouts 0.5; counterfactual: 5 replacements at 1.0, each "
            "rolled out once at 0.5") in out  # the trajectory is given: no trajectory stage
    run = open_run(tmp_path / "run")
    assert run.meta["config"]["counterfactual_draws"] == 5
    assert run.meta["config"]["counterfactual_temperature"] == 1.0
    assert len(run.rollouts[run.rollouts.kind == "counterfactual"]) == 5
    prefixes = run.rollouts[run.rollouts.kind == "prefix"]
    assert prefixes.pos.max() == run.tokens.pos.max() - 1  # the whole trajectory is no prefix
    assert prefixes.groupby("pos").size().eq(4).all()
    assert main(args) == 4
    with pytest.raises(SystemExit) as refused:  # argparse: --limit must be a positive integer
        main(args[:-2] + ["--out", str(tmp_path / "r2"), "--limit", "0"])
    assert refused.value.code == 2
    tasks.write_text("not json\n")
    assert main(args[:-2] + ["--out", str(tmp_path / "r3")]) == 2
    assert main(["critical", "--model", "no-such-model", "--out", str(tmp_path / "r4")]) == 3


def test_cli_help_gives_the_authors_temperatures(capsys):
    with pytest.raises(SystemExit) as done:
        main(["critical", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("get_model_sampling_config", "0.5 for Llama-3-8B", "0.85 for Llama-3-70B",
                   "0.9 for Qwen2.5-7B", "--counterfactual-draws", "(default 64, the authors')"):
        assert phrase in text, phrase


@pytest.mark.embedded
def test_smollm2_search_end_to_end(smollm2):
    """The search on SmolLM2-135M over a given wrong answer to a shipped task, n = 4.

    Checked against independent recomputation: critical_success is the prefix's verdict share
    in the rollouts table; the flag is where a hand-written rule puts it (the first zero after
    the last prefix with more than 3 correct); a rollout is redrawn by the cache-free sampler
    from its seed; the backward schedule draws exactly the all-prefix scan's rollouts at the
    prefixes it samples (seeds depend on task, prefix and index only).
    """
    from tokenprobe.analyses.critical.sampling import sample_reference
    from tokenprobe.analyses.critical.tasks import load_tasks, prompt_ids, stopper
    from tokenprobe.models import eos_ids

    task = load_tasks("arithmetic")[0]  # add-01: 27 + 15 = 42
    task = Task(task.task_id, task.question, task.verifier, task.answer,
                trajectory="27 + 15 = 43.")
    config = CriticalConfig(n_rollouts=4, max_new_tokens=10, batch_size=4, scan="all")
    run = critical_search(smollm2, [task], config, progress=False)
    tokens, rollouts = run.tokens, run.rollouts
    prefix = rollouts[rollouts.kind == "prefix"]
    assert (prefix.groupby("pos").size() == 4).all()
    share = prefix.groupby("pos").correct.mean()
    sampled = tokens.set_index("pos").critical_success.dropna()
    assert sampled.between(0, 1).all()
    pd.testing.assert_series_equal(sampled, share, check_names=False, check_dtype=False)
    assert tokens.critical.fillna(False).sum() <= 1
    n_prompt = len(prompt_ids(smollm2.tokenizer, task))
    counts = prefix[prefix.pos >= n_prompt].groupby("pos").correct.sum()
    last_reset = max([p for p, c in counts.items() if c > 3], default=-1)
    zeros = [p for p, c in counts.items() if c == 0 and p > last_reset]
    flagged = tokens.pos[tokens.critical.fillna(False).astype(bool)].tolist()
    assert flagged == zeros[:1]
    print("\n" + tokens[["pos", "token", "critical_success", "critical"]].tail(16).to_string())
    # one rollout, redrawn without the KV cache from its seed
    ids = tokens.token_id.tolist()
    row = prefix.iloc[len(prefix) // 2]
    response = ids[n_prompt:row.pos + 1]
    done = stopper(task.verifier)
    ref = sample_reference(
        smollm2.model, ids[:row.pos + 1], int(row.seed), temperature=config.temperature,
        max_new_tokens=config.max_new_tokens, eos_ids=eos_ids(smollm2.model, smollm2.tokenizer),
        stop=lambda c: done(smollm2.tokenizer.decode(response + c, skip_special_tokens=True)))
    assert ref.ids[0] == row.first_token_id and len(ref.ids) == row.n_tokens
    # the backward schedule samples a subset of the prefixes, with the same draws
    back = critical_search(smollm2, [task], CriticalConfig(**{**config.__dict__,
                                                              "scan": "backward"}),
                           progress=False)
    key = ["prompt_id", "pos", "kind", "rollout"]
    both = back.rollouts.merge(rollouts, on=key, suffixes=("", "_all"))
    assert len(both) == len(back.rollouts)
    for col in ("seed", "text", "correct", "n_tokens"):
        assert (both[col] == both[f"{col}_all"]).all(), col
    assert back.tokens.critical.fillna(False).tolist() == tokens.critical.fillna(False).tolist()
