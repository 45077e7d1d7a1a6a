"""Gumbel-max counterfactual generation: sampling law, replay, interventions, tables."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from tokenprobe.analyses.counterfactual import (
    COLUMNS,
    GENERATION_COLUMNS,
    GumbelConfig,
    Intervention,
    compare,
    counterfactual,
    counterfactuals,
    gumbel_max,
    gumbel_noise,
    sample,
)

PROMPT = "The cat sat on the"
CONFIG = GumbelConfig(temperature=1.0, max_new_tokens=12, stop_at_eos=False)


def _reference_decode(loaded, prompt_ids, forced, seed, config) -> list[int]:
    """Gumbel-max decoding without the KV cache: a full forward per step."""
    noise = gumbel_noise(seed, loaded.model.config.vocab_size)
    ids, out = list(prompt_ids), []
    for step in range(config.max_new_tokens):
        g = next(noise)
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = forced.get(step, int((logits / config.temperature + g).argmax()))
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize(("logits", "temperature"), [
    ([2.0, 1.0, 0.5, -1.0, 0.0], 1.0),
    ([2.0, 1.0, 0.5, -1.0, 0.0], 2.0),
    ([0.0, 0.0, 3.0], 0.5),
])
def test_gumbel_max_samples_from_softmax(logits, temperature):
    """Pearson's chi-square of 20000 draws against softmax(z / T) stays below the 0.1% point."""
    z = torch.tensor(logits)
    noise = gumbel_noise(11, len(logits))
    n = 20_000
    draws = torch.stack([gumbel_max(z, next(noise), temperature) for _ in range(n)])
    counts = torch.bincount(draws, minlength=len(logits)).double()
    expected = n * torch.softmax(z.double() / temperature, -1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    critical = {2: 13.82, 4: 18.47}[len(logits) - 1]  # chi-square 0.999 quantiles
    assert chi2 < critical, (chi2, counts.tolist(), expected.tolist())


def test_noise_is_reproducible_and_gumbel():
    a, b = gumbel_noise(3, 1000), gumbel_noise(3, 1000)
    first = [next(a) for _ in range(3)]
    assert all(torch.equal(x, next(b)) for x in first)
    assert not torch.equal(first[0], first[1])
    g = torch.cat(first + [next(a) for _ in range(47)]).double()  # 50000 draws
    assert abs(g.mean() - 0.5772) < 0.02  # Euler-Mascheroni constant
    assert abs(g.var() - torch.pi ** 2 / 6) < 0.05


def test_sample_matches_cache_free_reference(tiny_llama):
    fact = sample(tiny_llama, PROMPT, seed=5, config=CONFIG)
    assert len(fact.token_ids) == CONFIG.max_new_tokens
    assert list(fact.token_ids) == _reference_decode(tiny_llama, fact.prompt_ids, {}, 5, CONFIG)


def test_seed_reproducibility(tiny_llama):
    a = sample(tiny_llama, PROMPT, seed=1, config=CONFIG)
    assert sample(tiny_llama, PROMPT, seed=1, config=CONFIG) == a
    others = {sample(tiny_llama, PROMPT, seed=s, config=CONFIG).token_ids for s in (2, 3, 4)}
    assert any(o != a.token_ids for o in others)


def test_replay_without_intervention_reproduces_factual(tiny_llama):
    for seed in (0, 1, 2):
        fact = sample(tiny_llama, PROMPT, seed=seed, config=CONFIG)
        again = counterfactual(tiny_llama, fact)
        assert again.token_ids == fact.token_ids
        assert counterfactual(tiny_llama, fact, prompt=PROMPT).token_ids == fact.token_ids
        assert not compare(tiny_llama.tokenizer, fact, again).differs.any()


def test_intervening_at_the_last_step_changes_only_that_token(tiny_llama):
    fact = sample(tiny_llama, PROMPT, seed=0, config=CONFIG)
    last = len(fact.token_ids) - 1
    new = (fact.token_ids[last] + 1) % tiny_llama.model.config.vocab_size
    cf = counterfactual(tiny_llama, fact, step=last, token_id=new)
    assert cf.token_ids[:last] == fact.token_ids[:last] and cf.token_ids[last] == new
    table = compare(tiny_llama.tokenizer, fact, cf)
    assert table.differs.tolist() == [False] * last + [True]
    assert table.intervened.tolist() == [False] * last + [True]


@pytest.mark.parametrize("step", [0, 4])
def test_intervention_regenerates_later_steps_with_the_same_noise(tiny_llama, step):
    fact = sample(tiny_llama, PROMPT, seed=9, config=CONFIG)
    new = (fact.token_ids[step] + 7) % tiny_llama.model.config.vocab_size
    cf = counterfactual(tiny_llama, fact, step=step, token_id=new)
    forced = {**dict(enumerate(fact.token_ids[:step])), step: new}
    assert list(cf.token_ids) == _reference_decode(tiny_llama, fact.prompt_ids, forced, 9, CONFIG)
    assert cf.forced == tuple(sorted(forced.items()))


def test_prompt_intervention_uses_the_factual_noise(tiny_llama):
    fact = sample(tiny_llama, PROMPT, seed=4, config=CONFIG)
    cf = counterfactual(tiny_llama, fact, prompt="The dog sat on the")
    ids = tiny_llama.tokenizer("The dog sat on the")["input_ids"]
    assert list(cf.token_ids) == _reference_decode(tiny_llama, ids, {}, 4, CONFIG)


def test_stop_at_eos(tiny_llama):
    config = GumbelConfig(max_new_tokens=6)
    fact = sample(tiny_llama, PROMPT, seed=0, config=config)
    eos = tiny_llama.tokenizer.eos_token_id
    cf = counterfactual(tiny_llama, fact, step=1, token_id=eos)
    assert cf.token_ids == (*fact.token_ids[:1], eos)
    table = compare(tiny_llama.tokenizer, fact, cf)
    assert len(table) == len(fact.token_ids)
    missing = table.counterfactual_token_id.isna().tolist()
    assert missing == [False, False] + [True] * (len(table) - 2)
    assert table.differs.iloc[2:].all()


def test_counterfactuals_tables(tiny_llama):
    queries = [Intervention(PROMPT, seed=0), Intervention(PROMPT, seed=1, step=-1, token_id=65),
               Intervention(PROMPT, seed=2, step=3, token_id=66)]
    steps, gens = counterfactuals(tiny_llama, queries, CONFIG)
    assert list(steps.columns) == COLUMNS and list(gens.columns) == GENERATION_COLUMNS
    assert len(steps) == 3 * CONFIG.max_new_tokens
    assert steps.groupby("generation_id").intervened.sum().tolist() == [0, 1, 1]
    assert gens.intervention_step.tolist()[1:] == [CONFIG.max_new_tokens - 1, 3]
    assert pd.isna(gens.first_difference.iat[0])  # no intervention: nothing differs
    for gid in (1, 2):
        rows = steps[steps.generation_id == gid]
        first = rows.step[rows.differs].min()
        assert gens.first_difference.iat[gid] == first >= gens.intervention_step.iat[gid]


def test_bad_arguments(tiny_llama):
    fact = sample(tiny_llama, PROMPT, seed=0, config=CONFIG)
    with pytest.raises(ValueError, match="both"):
        counterfactual(tiny_llama, fact, step=1)
    with pytest.raises(ValueError, match="outside"):
        counterfactual(tiny_llama, fact, step=CONFIG.max_new_tokens, token_id=3)
    with pytest.raises(ValueError, match="temperature"):
        GumbelConfig(temperature=0)


@pytest.mark.embedded
def test_smollm2_counterfactual_story(smollm2):
    """Intervening on one early token of a sampled SmolLM2 continuation, same noise after it."""
    config = GumbelConfig(temperature=1.0, max_new_tokens=12)
    fact = sample(smollm2, "The capital of France is", seed=0, config=config)
    assert counterfactual(smollm2, fact).token_ids == fact.token_ids
    london = smollm2.tokenizer(" London", add_special_tokens=False)["input_ids"]
    assert len(london) == 1
    cf = counterfactual(smollm2, fact, step=0, token_id=london[0])
    table = compare(smollm2.tokenizer, fact, cf)
    print("\nfactual:       ", repr(fact.text(smollm2.tokenizer)))
    print("counterfactual:", repr(cf.text(smollm2.tokenizer)))
    print("differs after step 0:", int(table.differs.iloc[1:].sum()), "of", len(table) - 1)
    assert table.intervened.tolist()[0] and table.differs.iat[0] == (fact.token_ids[0] != london[0])


def test_cli_run_matches_reference_decoding(tiny_llama, tmp_path, capsys):
    """`tokenprobe counterfactual` writes generations equal to cache-free Gumbel-max decoding
    with the factual noise, the intervened token forced."""
    from tokenprobe.cli.main import main
    from tokenprobe.store import open_run
    from tokenprobe.tables import SCHEMAS

    out, seed, n = tmp_path / "run", 3, 6
    args = ["counterfactual", "--model", "tiny-llama", "--prompt", PROMPT, "--seed", str(seed),
            "--max-new-tokens", str(n), "--no-eos-stop", "--intervene", "2=x",
            "--intervene=-1=#66", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert "first differs at step" in capsys.readouterr().out
    run = open_run(out)
    assert list(run.counterfactuals.columns) == list(SCHEMAS["counterfactuals"])
    assert list(run.generations.columns) == list(SCHEMAS["generations"])
    tok, config = tiny_llama.tokenizer, GumbelConfig(temperature=1.0, max_new_tokens=n,
                                                     stop_at_eos=False)
    p_ids = tok(PROMPT)["input_ids"]
    assert run.tokens.token_id.tolist() == p_ids
    fact = _reference_decode(tiny_llama, p_ids, {}, seed, config)
    x = tok("x", add_special_tokens=False)["input_ids"][0]
    expected = [_reference_decode(tiny_llama, p_ids, {0: fact[0], 1: fact[1], 2: x}, seed, config),
                fact[:-1] + [66]]
    steps = run.counterfactuals
    for gid in (0, 1):
        rows = steps[steps.generation_id == gid]
        assert rows.factual_token_id.tolist() == fact
        assert rows.counterfactual_token_id.tolist() == expected[gid]
    assert run.generations.intervention_step.tolist() == [2, n - 1]
    assert run.generations.factual_text.iat[0] == tok.decode(fact)
    assert main(args) == 4
    bad = tmp_path / "bad"
    base = args[:-2] + ["--out", str(bad)]
    assert main([a for a in base if a not in ("--intervene", "2=x", "--intervene=-1=#66")]) == 2
    assert main(base + ["--intervene", "1=xy"]) == 2  # two tokens
    assert main(base + ["--intervene", f"{n}=x"]) == 2  # outside the generation
    assert main(base + ["--intervene", "a=x"]) == 2
    assert not bad.exists()
