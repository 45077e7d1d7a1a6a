"""Gumbel-max counterfactual generation: sampling law, replay, interventions, tables."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

from tokenprobe.analyses.counterfactual import (
    COLUMNS,
    GENERATION_COLUMNS,
    SAMPLE,
    GumbelConfig,
    Intervention,
    compare,
    counterfactual,
    counterfactuals,
    gumbel_max,
    gumbel_noise,
    replacement_token,
    sample,
    sample_token,
)
from tokenprobe.analyses.counterfactual_samplers import (
    top_k_gumbel_max,
    top_k_keep,
    top_p_gumbel_max,
    top_p_keep,
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


# --- The authors' samplers (Chatzi et al., github.com/Networks-Learning/counterfactual-llms) ---
# Re-implemented from their code path, not from tokenprobe's: probabilities softmax(z / T) with
# a batch dimension (src/llama3/llama/generation.py, `Llama.generate`), the noise of
# src/sampler.py drawn over the whole (1, V) vocabulary from their generator, sorted and masked
# as their `Sampler` methods do. Their generator lives on CUDA; here it is a CPU one, seeded as
# tokenprobe's `gumbel_noise` is, so both see the same uniforms.

def _authors_noise(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """src/sampler.py, the noise of `Sampler.gumbel_max` / `top_p_gumbel_max` /
    `top_k_gumbel_max`: uniforms of probs' shape, then -log(-log(u + eps) + eps)."""
    u = torch.rand(probs.size(), dtype=probs.dtype, generator=rng)
    eps = 1e-20
    return -torch.log(-torch.log(u + eps) + eps)


def _authors_pick(logits, temperature, noise, sampler, limit=None) -> int:
    """src/sampler.py: `Sampler.gumbel_max` ("vocabulary"), `Sampler.top_p_gumbel_max`
    ("top-p token", limit = top_p) or `Sampler.top_k_gumbel_max` ("top-k token", limit = k),
    given the (1, V) noise those methods draw."""
    probs = torch.softmax(torch.as_tensor(logits).float()[None] / temperature, dim=-1)  # (1, V)
    if sampler == "full":
        return int(torch.argmax(torch.log(probs) + noise, dim=-1))
    ranked, ids = torch.sort(probs, dim=-1, descending=True)
    if sampler == "top_p":
        drop = torch.cumsum(ranked, dim=-1) - ranked > limit  # mass before the token > p
    else:
        drop = torch.arange(ranked.shape[-1])[None] >= limit  # their probs_sort[:, k:] = 0
    ranked = ranked.masked_fill(drop, 0.0)
    ranked = ranked / ranked.sum(dim=-1, keepdim=True)  # their renormalisation
    noise_by_rank = torch.gather(noise, -1, ids).masked_fill(drop, 0.0)  # noise stays by id
    best_rank = torch.argmax(torch.log(ranked) + noise_by_rank, dim=-1, keepdim=True)
    return int(torch.gather(ids, -1, best_rank))


def _authors_replacement(logits, temperature, factual, top_p=0.9, seed=42) -> int:
    """src/sampler.py, `Sampler.intervention` on softmax(z / T) (as `Llama.generate` calls it
    with auto_intervention): the top-p nucleus without the factual token, renormalised, one
    multinomial draw from a generator seeded afresh; the second token if nothing is left."""
    probs = torch.softmax(torch.as_tensor(logits).float()[None] / temperature, dim=-1)  # (1, V)
    ranked, ids = torch.sort(probs, dim=-1, descending=True)
    ranked[torch.cumsum(ranked, dim=-1) - ranked > top_p] = 0.0
    ranked[0][ids[0] == factual] = 0.0
    if torch.count_nonzero(ranked) == 0:
        return int(ids[0][1])
    ranked = ranked / ranked.sum(dim=-1, keepdim=True)
    rng = torch.Generator().manual_seed(seed)
    return int(torch.gather(ids, -1, torch.multinomial(ranked, 1, generator=rng)))


def _authors_decode(loaded, prompt_ids, forced, seed, config) -> list[int]:
    """Their generation loop, cache-free: one generator seeded with `seed`; a sampled step draws
    its noise from it. A forced step draws too and drops it: their counterfactual restores the
    generator state saved at the first step after the intervention (src/cf_query.py,
    src/stability.py), which is the same stream position."""
    rng = torch.Generator().manual_seed(seed)
    limit = {"top_p": config.top_p, "top_k": config.top_k}.get(config.sampler)
    ids, out = list(prompt_ids), []
    for step in range(config.max_new_tokens):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        noise = _authors_noise(torch.empty(1, logits.shape[-1]), rng)
        token = forced.get(step, _authors_pick(logits, config.temperature, noise, config.sampler,
                                               limit))
        ids.append(token)
        out.append(token)
    return out


HAND_LOGITS = [
    [2.0, 1.0, 0.5, -1.0, 0.0, 1.5, -0.3, 0.7],
    [0.0, 4.0, 3.9, 3.7, -2.0, 1.0, 0.2, -5.0],
    (torch.arange(50.0) * 0.37 % 5.3).tolist(),  # 50 distinct values in scrambled order
]
SAMPLER_CASES = [("full", None), ("top_p", 0.3), ("top_p", 0.6), ("top_p", 0.9), ("top_p", 0.99),
                 ("top_k", 1), ("top_k", 2), ("top_k", 5)]


def _config(sampler, limit, temperature=1.0, **kwargs):
    key = {"top_p": "top_p", "top_k": "top_k"}.get(sampler)
    return GumbelConfig(temperature=temperature, sampler=sampler,
                        **({key: limit} if key else {}), **kwargs)


@pytest.mark.parametrize(("sampler", "limit"), SAMPLER_CASES)
@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.0])
def test_samplers_pick_the_authors_tokens(sampler, limit, temperature):
    """For the same seed, tokenprobe's sampler and the authors' pick the same token id (over
    the first 3 steps of 100 seeds on each hand-made logit vector)."""
    config = _config(sampler, limit, temperature)
    for logits in HAND_LOGITS:
        z = torch.tensor(logits)
        for seed in range(100):
            ours, rng = gumbel_noise(seed, len(logits)), torch.Generator().manual_seed(seed)
            for _ in range(3):  # step t's noise is the t-th draw of both generators
                theirs = _authors_pick(z, temperature, _authors_noise(z[None], rng), sampler,
                                       limit)
                assert int(sample_token(z, next(ours), config)) == theirs, (logits, seed)


def test_same_noise_follows_the_token_id_not_its_rank():
    """Token 0 is ranked first in the factual distribution and third in the counterfactual one,
    inside both nuclei; its large noise makes it the sample in both (a noise tied to ranks
    would give the counterfactual token 2, ranked first there)."""
    z_fact = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    z_cf = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0])  # tokens 0 and 2 swapped
    g = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0])
    for config in (_config("top_p", 0.9), _config("top_k", 3)):
        limit = config.top_p or config.top_k
        for z in (z_fact, z_cf):
            assert int(sample_token(z, g, config)) == 0
            assert _authors_pick(z, 1.0, g[None], config.sampler, limit) == 0


@pytest.mark.parametrize(("sampler", "limit"), [("top_p", 0.9), ("top_p", 0.5), ("top_k", 5)])
def test_factual_and_counterfactual_share_the_noise_per_token_id(tiny_llama, sampler, limit):
    """Both generations equal the authors' loop replaying one noise stream: at every step the
    counterfactual's nucleus is its own, the noise of each token id the factual one's."""
    config = _config(sampler, limit, 1.0, max_new_tokens=10, stop_at_eos=False)
    fact = sample(tiny_llama, PROMPT, seed=0, config=config)
    assert list(fact.token_ids) == _authors_decode(tiny_llama, fact.prompt_ids, {}, 0, config)
    new = (fact.token_ids[2] + 11) % tiny_llama.model.config.vocab_size
    cf = counterfactual(tiny_llama, fact, step=2, token_id=new)
    forced = {0: fact.token_ids[0], 1: fact.token_ids[1], 2: new}
    assert list(cf.token_ids) == _authors_decode(tiny_llama, fact.prompt_ids, forced, 0, config)
    keep = top_p_keep if sampler == "top_p" else top_k_keep
    nuclei = []
    for gen in (fact, cf):  # the kept tokens of steps 3.. (after the intervention)
        with torch.no_grad():
            logits = tiny_llama.model(input_ids=torch.tensor(
                [list(gen.prompt_ids) + list(gen.token_ids)])).logits[0]  # (P + n, V)
        nuclei.append(keep(logits[len(gen.prompt_ids) + 2:-1], 1.0, limit))  # (n - 3, V)
    assert (nuclei[0] != nuclei[1]).any()  # not vacuous: the nuclei differ after step 2


def test_top_p_one_is_the_full_sampler(tiny_llama):
    """p = 1 keeps the whole vocabulary, also where the float32 cumulative mass passes 1 before
    the least probable token (the hand case: their rule would drop token 2)."""
    z, g = torch.tensor([-0.004426528699696064, -0.0008279146277345717, -25.0]), \
        torch.tensor([0.0, 0.0, 30.0])
    probs = torch.sort(torch.softmax(z, -1), descending=True).values
    assert float((probs.cumsum(-1) - probs)[-1]) > 1.0  # the float32 rounding this case needs
    assert int(gumbel_max(z, g, 1.0)) == int(top_p_gumbel_max(z, g, 1.0, 1.0)) == 2
    for logits in HAND_LOGITS:
        noise = gumbel_noise(1, len(logits))
        for _ in range(300):
            g = next(noise)
            assert int(top_p_gumbel_max(torch.tensor(logits), g, 0.8, 1.0)) == \
                int(gumbel_max(torch.tensor(logits), g, 0.8))
    config = GumbelConfig(max_new_tokens=10, stop_at_eos=False)
    for seed in (0, 1):
        assert sample(tiny_llama, PROMPT, seed=seed, config=replace(config, sampler="top_p",
                                                                    top_p=1.0)).token_ids \
            == sample(tiny_llama, PROMPT, seed=seed, config=config).token_ids


def test_nucleus_excludes_the_noisy_argmax():
    """Probabilities (0.5, 0.3, 0.15, 0.05), p = 0.6: the nucleus is {0, 1} (token 1 crosses p
    and is kept). Noise that makes token 2 the full sampler's pick leaves top-p with the best
    nucleus token."""
    z = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for g, full, nucleus in (([0.0, 0.0, 5.0, 0.0], 2, 0), ([0.0, 1.0, 5.0, 0.0], 2, 1),
                             ([0.0, 0.0, 0.0, 9.0], 3, 0)):
        g = torch.tensor(g)
        assert int(gumbel_max(z, g, 1.0)) == _authors_pick(z, 1.0, g[None], "full") == full
        assert int(top_p_gumbel_max(z, g, 1.0, 0.6)) == _authors_pick(z, 1.0, g[None], "top_p",
                                                                       0.6) == nucleus
        assert int(top_k_gumbel_max(z, g, 1.0, 2)) == _authors_pick(z, 1.0, g[None], "top_k",
                                                                     2) == nucleus


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_replacement_is_the_authors_intervention(temperature):
    """`replacement_token` draws what `Sampler.intervention` draws, for every factual token
    (inside and outside the nucleus), seed and p; never the factual token."""
    for logits in HAND_LOGITS:
        z = torch.tensor(logits)
        for top_p in (0.5, 0.9):
            for factual in range(len(logits)):
                for seed in (0, 42, 7):
                    ours = replacement_token(z, factual, temperature=temperature, top_p=top_p,
                                             seed=seed)
                    assert ours == _authors_replacement(z, temperature, factual, top_p, seed)
                    assert ours != factual
    z = torch.tensor([5.0, 1.0, 0.0, -1.0])  # p(token 0) = 0.97 > 0.9: the nucleus is {0}
    assert replacement_token(z, 0, temperature=1.0) == _authors_replacement(z, 1.0, 0) == 1


def test_sampled_replacement_in_a_counterfactual(tiny_llama):
    """token_id=SAMPLE forces the authors' draw on the logits at that step, then regenerates
    with the factual noise."""
    config = _config("top_p", 0.9, 0.6, max_new_tokens=8, stop_at_eos=False)
    fact = sample(tiny_llama, PROMPT, seed=2, config=config)
    cf = counterfactual(tiny_llama, fact, step=3, token_id=SAMPLE)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor(
            [list(fact.prompt_ids) + list(fact.token_ids[:3])])).logits[0, -1]
    drawn = _authors_replacement(logits, 0.6, fact.token_ids[3])
    assert cf.forced[-1] == (3, drawn) and drawn != fact.token_ids[3]
    forced = {**dict(enumerate(fact.token_ids[:3])), 3: drawn}
    assert list(cf.token_ids) == _authors_decode(tiny_llama, fact.prompt_ids, forced, 2, config)
    with pytest.raises(ValueError, match="token id or 'sample'"):
        counterfactual(tiny_llama, fact, step=3, token_id="resample")


def test_sampler_settings_are_checked():
    for kwargs, message in (({"sampler": "nucleus"}, "unknown sampler"),
                            ({"sampler": "top_p"}, "top_p goes with sampler='top_p'"),
                            ({"top_p": 0.9}, "top_p goes with"),
                            ({"sampler": "top_k", "top_k": 3, "top_p": 0.9}, "top_p goes with"),
                            ({"sampler": "top_k"}, "top_k goes with"),
                            ({"sampler": "top_p", "top_p": 0.0}, "top_p must be in"),
                            ({"sampler": "top_p", "top_p": 1.5}, "top_p must be in"),
                            ({"sampler": "top_k", "top_k": 0}, "top_k must be"),
                            ({"sampler": "top_k", "top_k": 2.0}, "top_k must be"),
                            ({"replacement_top_p": 0.0}, "replacement_top_p")):
        with pytest.raises(ValueError, match=message):
            GumbelConfig(**kwargs)


def test_cli_sampler_and_sampled_replacement(tiny_llama, tmp_path, capsys):
    """`--sampler top_k --replacement sample` runs the authors' loop, and run.json and the
    generations table record the sampler, its k, the temperature and the replacement rule."""
    import json

    from tokenprobe.cli.main import main
    from tokenprobe.store import open_run

    out, seed, n = tmp_path / "run", 4, 6
    base = ["counterfactual", "--model", "tiny-llama", "--prompt", PROMPT, "--seed", str(seed),
            "--max-new-tokens", str(n), "--no-eos-stop", "--temperature", "0.6", "--sampler",
            "top_k", "--top-k", "3", "--quiet"]
    args = base + ["--replacement", "sample", "--intervene", "1"]
    assert main(args + ["--out", str(out)]) == 0
    assert "sampler top_k k=3" in capsys.readouterr().out
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"] == {"temperature": 0.6, "max_new_tokens": n, "stop_at_eos": False,
                              "sampler": "top_k", "top_p": None, "top_k": 3,
                              "replacement_top_p": 0.9, "replacement_seed": 42}
    assert meta["queries"][0]["token_id"] == SAMPLE
    run = open_run(out)
    gen = run.generations.iloc[0]
    assert (gen.sampler, gen.top_k, gen.replacement, gen.temperature) == ("top_k", 3, "sampled",
                                                                          0.6)
    assert pd.isna(gen.top_p)
    config = _config("top_k", 3, 0.6, max_new_tokens=n, stop_at_eos=False)
    p_ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    fact = _authors_decode(tiny_llama, p_ids, {}, seed, config)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([p_ids + fact[:1]])).logits[0, -1]
    drawn = _authors_replacement(logits, 0.6, fact[1])
    assert int(gen.intervention_token_id) == drawn
    rows = run.counterfactuals
    assert rows.factual_token_id.tolist() == fact
    assert rows.counterfactual_token_id.tolist() == _authors_decode(
        tiny_llama, p_ids, {0: fact[0], 1: drawn}, seed, config)
    bad = str(tmp_path / "bad")
    assert main(args + ["--intervene", "2=x", "--out", bad]) == 2  # a token, yet sampled
    assert main(base + ["--intervene", "1", "--out", bad]) == 2  # given, yet no token
    assert main(base + ["--replacement", "sample", "--out", bad]) == 2  # no --intervene
    assert main(args + ["--top-p", "0.5", "--out", bad]) == 2  # top-p without --sampler top_p
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(args + ["--replacement-top-p", "0", "--out", bad])
    assert exit_.value.code == 2
    assert not (tmp_path / "bad").exists()


def test_cli_help_gives_the_authors_settings(capsys):
    from tokenprobe.cli.main import main

    with pytest.raises(SystemExit):
        main(["counterfactual", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("0.6 in src/single_query.py", "0.9 for their stories", "top-p 0.9",
                   "top-k 10", "seed 42", "--sampler {full,top_p,top_k}"):
        assert needle in text, needle
