"""Shapley values of prompt units (tokenprobe.analyses.attribution_shapley): the axioms on
hand-built games with hand-computed values, an independent all-orders oracle, sampling against
exact, and the model game on the tiny random models."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokenprobe.analyses.attribution_gradients import baseline_ids
from tokenprobe.analyses.attribution_shapley import (UnitGame, all_coalitions, exact_shapley,
                                                     filler_id, sampled_shapley, shapley)
from tokenprobe.analyses.attribution_targets import resolve_target, score_ids
from tokenprobe.analyses.attribution_units import split_units
from tokenprobe.analyses.spans_segment import start_token_id

PROMPT = "The cat sat on the"


def square(w):
    """v(S) = (sum of w over S)^2: phi_i = w_i * sum(w) (the pair terms split equally)."""
    w = np.asarray(w, dtype=float)
    return lambda c: (np.asarray(c, dtype=float) @ w) ** 2


def majority(w, quota):
    """The weighted majority game: v(S) = 1 when the weight of S reaches the quota."""
    w = np.asarray(w, dtype=float)
    return lambda c: (np.asarray(c, dtype=float) @ w >= quota).astype(float)


def all_orders(value, n):
    """Independent reference: the mean marginal contribution over all n! orders."""
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        present = np.zeros(n, dtype=bool)
        before = value(present[None])[0]
        for i in order:
            present[i] = True
            after = value(present[None])[0]
            phi[i] += after - before
            before = after
    return phi / len(orders)


def test_hand_computed_values_for_three_players():
    np.testing.assert_allclose(exact_shapley(square([1, 2, 3]), 3), [6, 12, 18])
    # quota 3 with weights (2, 1, 1): player 0 is pivotal in 4 of the 6 orders
    np.testing.assert_allclose(exact_shapley(majority([2, 1, 1], 3), 3), [2 / 3, 1 / 6, 1 / 6])


def test_axioms_efficiency_symmetry_null_linearity():
    v = majority([3, 2, 2, 1, 0], 5)  # players 1 and 2 symmetric, player 4 null
    phi = exact_shapley(v, 5)
    full, empty = v(np.array([[True] * 5, [False] * 5]))
    assert phi.sum() == pytest.approx(full - empty, abs=1e-12)
    assert phi[1] == pytest.approx(phi[2], abs=1e-12) and phi[4] == 0
    u = square([1, -2, 0.5, 3, 0])
    both = exact_shapley(lambda c: 2 * v(c) - 0.5 * u(c), 5)
    np.testing.assert_allclose(both, 2 * phi - 0.5 * exact_shapley(u, 5), atol=1e-12)
    np.testing.assert_allclose(phi, all_orders(v, 5), atol=1e-12)


def test_exact_makes_one_batched_call_and_refuses_large_n():
    calls = []

    def v(c):
        calls.append(c.shape)
        return c.sum(1).astype(float)

    np.testing.assert_allclose(exact_shapley(v, 4), [1, 1, 1, 1])
    assert calls == [(16, 4)]
    assert len({tuple(r) for r in all_coalitions(4)}) == 16
    with pytest.raises(ValueError, match="sampled_shapley"):
        exact_shapley(v, 13)


def test_sampled_converges_to_exact_with_exact_efficiency():
    v = majority([4, 3, 2, 2, 1, 1], 7)
    exact = exact_shapley(v, 6)
    full, empty = v(np.array([[True] * 6, [False] * 6]))
    for antithetic, perms in [(True, 2), (False, 1), (True, 400), (False, 400)]:
        est = sampled_shapley(v, 6, permutations=perms, seed=3, antithetic=antithetic)
        assert est.values.sum() == pytest.approx(full - empty, abs=1e-9)
    assert np.isnan(sampled_shapley(v, 6, permutations=2).se).all()  # one pair: no spread
    est = sampled_shapley(v, 6, permutations=400, seed=1)
    assert np.all(est.se > 0) and est.permutations == 400 and not est.exact
    assert np.all(np.abs(est.values - exact) <= 3 * est.se + 1e-12)
    assert est.evaluations <= 2 ** 6


def test_standard_error_matches_the_spread_over_seeds():
    v = majority([4, 3, 2, 2, 1, 1], 7)
    for antithetic in (True, False):
        runs = [sampled_shapley(v, 6, permutations=16, seed=s, antithetic=antithetic)
                for s in range(300)]
        spread = np.std([r.values for r in runs], axis=0, ddof=1)  # (6,) the true se, nearly
        rms_se = np.sqrt(np.mean([r.se ** 2 for r in runs], axis=0))  # se**2 is unbiased
        np.testing.assert_allclose(rms_se, spread, rtol=0.2)


def test_rounds_call_value_once_on_unknown_coalitions():
    seen, calls = set(), []

    def v(c):
        keys = {tuple(r) for r in c}
        assert not keys & seen and len(keys) == len(c)  # only new, distinct coalitions
        seen.update(keys)
        calls.append(len(c))
        return c.sum(1).astype(float)

    est = sampled_shapley(v, 5, permutations=20, batch=8)
    assert len(calls) == 3 and est.evaluations == len(seen) == sum(calls)
    with pytest.raises(ValueError, match="even"):
        sampled_shapley(v, 5, permutations=3)


def test_antithetic_pairs_reduce_the_standard_error():
    rng = np.random.default_rng(0)
    w, c = rng.normal(size=6), rng.normal(size=(6, 6))

    def v(s):  # additive plus pairwise and one three-way interaction
        x = np.asarray(s, dtype=float)
        return x @ w + np.einsum("ki,ij,kj->k", x, np.triu(c, 1), x) + x[:, 0] * x[:, 1] * x[:, 2]

    anti = sampled_shapley(v, 6, permutations=64, seed=0, antithetic=True)
    plain = sampled_shapley(v, 6, permutations=64, seed=0, antithetic=False)
    assert anti.se.mean() < 0.5 * plain.se.mean()


@pytest.fixture()
def game(tiny_llama):
    ids, units = split_units(tiny_llama.tokenizer, PROMPT, "word")
    target = resolve_target(tiny_llama, ids, continuation=" mat")
    return UnitGame(tiny_llama, ids, units, target)


def test_model_game_efficiency_and_memo(game, tiny_llama):
    est = shapley(game)
    assert est.exact and game.n == 5 and game.evaluations == 2 ** 5
    ends = score_ids(tiny_llama, [game.ids, game.sequence([False] * 5)], game.target)
    assert est.values.sum() == pytest.approx(ends[0] - ends[1], abs=1e-6)
    again = shapley(game)
    assert game.evaluations == 2 ** 5
    np.testing.assert_array_equal(again.values, est.values)
    assert game.values(np.ones((3, 5), dtype=bool)) == pytest.approx([ends[0]] * 3, abs=1e-5)
    assert game.evaluations == 2 ** 5
    rows = []
    fresh = UnitGame(tiny_llama, game.ids, game.units, game.target, progress=rows.append)
    some = all_coalitions(5)[[3, 3, 7, 3]]
    np.testing.assert_allclose(fresh.values(some), game.values(some), atol=1e-5)
    assert fresh.evaluations == 2 and sum(rows) == 2  # duplicates scored once
    fresh.values(all_coalitions(5)[[7, 9, 9, 1]])
    assert fresh.evaluations == 4 and sum(rows) == 4  # only the new ones
    with pytest.raises(ValueError, match=r"\(k, 5\)"):
        game.values(np.ones((2, 4), dtype=bool))


def test_removed_and_filler_sequences(game, tiny_llama, tiny_gemma3):
    tok = tiny_llama.tokenizer
    present = [True, False, True, False, True]
    kept = [p for u, r in zip(game.units, present) if r for p in u.positions]
    assert game.sequence(present) == [game.ids[p] for p in sorted(kept)]
    assert tok("x")["input_ids"][0] != tok.bos_token_id  # tiny_llama adds no BOS
    assert game.sequence([False] * 5) == [start_token_id(tok, "auto")]
    filled = UnitGame(tiny_llama, game.ids, game.units, game.target, absent="filler")
    for row in all_coalitions(5):
        gone = {p for u, r in zip(game.units, row) if not r for p in u.positions}
        assert filled.sequence(row) == [filled.filler_id if p in gone else i
                                        for p, i in enumerate(game.ids)]
    assert filled.sequence([False] * 5) == baseline_ids(tiny_llama, game.ids, "pad")
    assert filled.describe()["filler_id"] == tok.pad_token_id and filled.describe()["n_units"] == 5
    assert filler_id(tok, "_") == tok("_", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="exactly one"):
        filler_id(tok, " _ _")
    with pytest.raises(ValueError, match="mask"):
        UnitGame(tiny_llama, game.ids, game.units, game.target, absent="filler", filler="mask")
    ids, units = split_units(tiny_gemma3.tokenizer, PROMPT, "word")
    bos = tiny_gemma3.tokenizer.bos_token_id
    gemma = UnitGame(tiny_gemma3, ids, units, resolve_target(tiny_gemma3, ids, continuation="!"))
    assert ids[0] == bos and gemma.sequence([False] * gemma.n) == [bos]  # BOS kept, no start
    assert gemma.sequence([True] * gemma.n) == ids
    assert UnitGame(tiny_gemma3, ids, units, gemma.target, absent="filler").sequence(
        [False] * gemma.n) == [bos] + [tiny_gemma3.tokenizer.pad_token_id] * (len(ids) - 1)


def test_batching_matches_single_rows(game, tiny_llama):
    done = []
    batched = UnitGame(tiny_llama, game.ids, game.units, game.target, absent="filler",
                       batch_size=16, progress=done.append)
    single = UnitGame(tiny_llama, game.ids, game.units, game.target, absent="filler",
                      batch_size=1)
    everything = all_coalitions(5)
    np.testing.assert_allclose(batched.values(everything), single.values(everything), atol=1e-5)
    assert sum(done) == 32 and len(done) == 2  # one row per coalition, two forwards of 16


def test_sampled_converges_toward_exact_on_the_model(game):
    exact = shapley(game).values
    est = shapley(game, permutations=48, seed=0)
    assert not est.exact and est.evaluations <= 2 ** 5
    assert est.values.sum() == pytest.approx(exact.sum(), abs=1e-9)
    # 4 se: 24 pair means of a 5-unit game are heavy-tailed (|error| / se has std ~1.3 here)
    assert np.all(np.abs(est.values - exact) <= 4 * est.se)
    few = shapley(game, permutations=4, seed=0)
    assert np.abs(est.values - exact).mean() < np.abs(few.values - exact).mean()
