"""Shapley values of prompt units: the cooperative game "which units are present" scored by a
target, solved exactly (n <= 12) or by antithetic permutation sampling with standard errors."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tokenprobe.analyses.attribution_gradients import fill_token_id
from tokenprobe.analyses.attribution_targets import Target, score_ids
from tokenprobe.analyses.attribution_units import Unit
from tokenprobe.analyses.spans_segment import start_token_id
from tokenprobe.models import LoadedModel

ABSENT = ("removed", "filler")
EXACT_MAX = 12
ValueFn = Callable[[np.ndarray], np.ndarray]  # (k, n) bool coalitions -> (k,) values


def filler_id(tokenizer, filler: str) -> int:
    """The token that stands in for an absent unit's tokens: "pad" and "mask" as
    `attribution_gradients.fill_token_id` chooses them for baselines, or any other text that
    tokenises (add_special_tokens=False) to exactly one token.

    Raises:
        ValueError: no such special token, or a text of other than one token.
    """
    if filler in ("pad", "mask"):
        return fill_token_id(tokenizer, filler, "filler")
    ids = tokenizer(filler, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the filler text {filler!r} is {len(ids)} tokens; it must be "
                         "exactly one (or use 'pad' / 'mask')")
    return int(ids[0])


class UnitGame:
    """The cooperative game over a prompt's units: v(S) = the target's value (`score_ids`,
    nats) of the prompt in which only the units in coalition S are present.

    A coalition is a length-n bool vector, True for a present unit. Absent units are either
    deleted ("removed": later tokens shift left) or have each of their tokens replaced by the
    filler token ("filler": the length and every position are kept). Tokens in no unit (the
    special tokens a tokenizer adds, e.g. BOS) are present in every coalition.

    The empty prompt: when a "removed" coalition leaves no token at all (a tokenizer that adds
    no BOS, every unit absent), the sequence is the start token alone
    (`start_token_id(tokenizer, "auto")`, e.g. <|endoftext|>), so v(empty) is the target's
    value with no prompt. Only such an otherwise empty sequence gets it; every other coalition
    is the prompt's own tokens, so v(all units) is the value of the prompt itself.

    Values are memoised per coalition: none is scored twice; `evaluations` counts the
    coalitions actually scored (each one forward row per target option).
    """

    def __init__(self, loaded: LoadedModel, prompt_ids: Sequence[int], units: Sequence[Unit],
                 target: Target, *, absent: str = "removed", filler: str = "pad",
                 batch_size: int = 16, progress: Callable[[int], object] | None = None) -> None:
        """Args:
            loaded: a `tokenprobe.load()` result.
            prompt_ids, units: from `split_units`.
            target: what is scored (`resolve_target`).
            absent: "removed" or "filler".
            filler: the filler of "filler" mode (`filler_id`); unused when removed.
            batch_size: rows per forward of `score_ids`.
            progress: passed to `score_ids` (a tqdm bar or a callable of rows done).
        """
        if absent not in ABSENT:
            raise ValueError(f"unknown absent mode {absent!r}; use one of {ABSENT}")
        if not units:
            raise ValueError("the game needs at least one unit")
        self.loaded, self.target, self.absent = loaded, target, absent
        self.ids, self.units = [int(i) for i in prompt_ids], list(units)
        self.n = len(self.units)
        self.batch_size, self.progress = batch_size, progress
        tok = loaded.tokenizer
        self.filler = filler if absent == "filler" else None
        self.filler_id = filler_id(tok, filler) if absent == "filler" else None
        self.start_id = start_token_id(tok, "auto") if absent == "removed" else None
        self._owner = np.full(len(self.ids), -1)  # unit index of each position, -1: always kept
        for k, unit in enumerate(self.units):
            self._owner[list(unit.positions)] = k
        self._memo: dict[tuple[bool, ...], float] = {}
        self.evaluations = 0

    def sequence(self, present: Sequence[bool]) -> list[int]:
        """The prompt ids of a coalition (see the class doc): absent units removed or filled."""
        if len(present) != self.n:
            raise ValueError(f"a coalition has {self.n} entries, got {len(present)}")
        keep = np.append(np.asarray(present, dtype=bool), True)[self._owner]  # (T,), -1: True
        if self.absent == "filler":
            return [i if k else self.filler_id for i, k in zip(self.ids, keep)]
        seq = [i for i, k in zip(self.ids, keep) if k]
        if not seq:
            if self.start_id is None:
                raise ValueError("the empty coalition leaves no token and the tokenizer has no "
                                 "start token (<|endoftext|>, BOS or EOS) to score it after")
            seq = [self.start_id]
        return seq

    def values(self, coalitions: np.ndarray) -> np.ndarray:
        """(k,) float64 v(S) of a (k, n) bool array, scoring only coalitions not seen before
        (in one batched `score_ids` call)."""
        c = np.asarray(coalitions, dtype=bool)
        if c.ndim != 2 or c.shape[1] != self.n:
            raise ValueError(f"coalitions must be a (k, {self.n}) bool array, got {c.shape}")
        keys = [tuple(map(bool, row)) for row in c]
        new = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if new:
            got = score_ids(self.loaded, [self.sequence(k) for k in new], self.target,
                            batch_size=self.batch_size, progress=self.progress)
            self._memo.update(zip(new, got.tolist()))
            self.evaluations += len(new)
        return np.array([self._memo[k] for k in keys], dtype=np.float64)

    def describe(self) -> dict:
        """The game's settings: absent mode, filler token (id and text; None when removed),
        units, the start token of an empty "removed" prompt (None in filler mode), target."""
        tok = self.loaded.tokenizer
        return {"absent": self.absent, "filler": self.filler, "filler_id": self.filler_id,
                "filler_text": None if self.filler_id is None else tok.decode([self.filler_id]),
                "n_units": self.n, "start_token_id": self.start_id,
                "target": self.target.describe()}


def all_coalitions(n: int) -> np.ndarray:
    """(2**n, n) bool: row m is the coalition of the set bits of m (unit i = bit i)."""
    return (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1 == 1


def exact_shapley(value: ValueFn, n: int) -> np.ndarray:
    """Shapley values (Shapley 1953), (n,) float64, from all 2**n coalitions in one `value` call:

        phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)).

    They are efficient (sum_i phi_i = v(all) - v(empty)), symmetric, zero for a null player
    and linear in v. Raises ValueError for n < 1 or n > 12 (use `sampled_shapley`)."""
    if not 1 <= n <= EXACT_MAX:
        raise ValueError(f"exact Shapley values enumerate 2**n coalitions; n = {n} is outside "
                         f"1..{EXACT_MAX}: use sampled_shapley (permutation sampling)")
    v = np.asarray(value(all_coalitions(n)), dtype=np.float64)  # (2**n,)
    masks = np.arange(2 ** n)
    size = all_coalitions(n).sum(1)  # (2**n,) |S|
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                       for s in range(n)])  # by |S| = 0 .. n - 1
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]  # the S not containing i
        phi[i] = (weight[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return phi


@dataclass
class ShapleyEstimate:
    """Shapley values of a game and how they were obtained.

    Attributes:
        values: (n,) float64 Shapley values (the target's units: nats).
        se: (n,) standard errors (0 when exact; NaN with fewer than 2 i.i.d. samples).
        permutations: permutations sampled, reverses included (0 when exact).
        evaluations: distinct coalitions the value function was asked for.
        exact: enumerated (True) or sampled.
    """

    values: np.ndarray
    se: np.ndarray
    permutations: int
    evaluations: int
    exact: bool


def sampled_shapley(value: ValueFn, n: int, *, permutations: int = 64, seed: int = 0,
                    antithetic: bool = True, batch: int = 16) -> ShapleyEstimate:
    """Shapley values by permutation sampling (Castro, Gomez, Tejada 2009, "Polynomial
    calculation of the Shapley value based on sampling").

    A uniformly random order of the units (numpy Generator(seed)) gives each unit i the
    marginal contribution v(P_i + i) - v(P_i), P_i the units before it; its mean over orders is
    an unbiased estimate of phi_i. With `antithetic`, every sampled order is followed by its
    reverse (Mitchell, Cooper, Frank, Holmes 2022, "Sampling permutations for Shapley value
    estimation"): the pair's mean marginal is one i.i.d. sample (it cancels the variance of
    every pairwise interaction). `se` is the std (ddof=1) of the i.i.d. samples (pair means,
    else single orders) / sqrt(their number), NaN with fewer than two.

    Efficiency holds exactly for every order (its marginals telescope to v(all) - v(empty)),
    so also for the estimate, up to rounding.

    Each round takes `batch` orders, collects their n + 1 prefix coalitions each and calls
    `value` once on those not known yet, so a model scores them in batches.

    Args:
        value: (k, n) bool coalitions -> (k,) values.
        n: the number of players (>= 1).
        permutations: orders to sample, reverses included (even when antithetic).
        seed: the Generator seed.
        antithetic: pair each order with its reverse.
        batch: orders per round (whole pairs when antithetic).
    """
    step = 2 if antithetic else 1
    if n < 1 or permutations < 1 or permutations % step or batch < step:
        raise ValueError(f"need n >= 1, permutations >= 1 (even when antithetic) and batch >= "
                         f"{step}; got n={n}, permutations={permutations}, batch={batch}")
    rng = np.random.default_rng(seed)
    known: dict[bytes, float] = {}
    marginals = np.zeros((permutations, n))  # (P, n) marginal contribution of each unit
    batch -= batch % step
    for start in range(0, permutations, batch):
        count = min(batch, permutations - start)
        orders = [rng.permutation(n) for _ in range(count // step)]
        if antithetic:
            orders = [o for order in orders for o in (order, order[::-1])]
        chains = np.zeros((count, n + 1, n), dtype=bool)  # (P_b, n + 1, n) prefix coalitions
        for p, order in enumerate(orders):
            for k, unit in enumerate(order):
                chains[p, k + 1:, unit] = True
        flat = chains.reshape(-1, n)
        todo = {row.tobytes(): row for row in flat if row.tobytes() not in known}
        if todo:
            got = np.asarray(value(np.stack(list(todo.values()))), dtype=np.float64)
            known.update(zip(todo, got.tolist()))
        v = np.array([known[row.tobytes()] for row in flat]).reshape(count, n + 1)
        for p, order in enumerate(orders):
            marginals[start + p, order] = np.diff(v[p])
    samples = marginals.reshape(-1, step, n).mean(1)  # (P / step, n) i.i.d. samples
    se = (samples.std(0, ddof=1) / np.sqrt(len(samples)) if len(samples) > 1
          else np.full(n, np.nan))
    return ShapleyEstimate(marginals.mean(0), se, permutations, len(known), False)


def shapley(game: UnitGame, *, permutations: int | None = None, seed: int = 0,
            exact_max: int = 10) -> ShapleyEstimate:
    """The Shapley values of a `UnitGame`: exact (se 0) when game.n <= exact_max and no
    `permutations` are given, else `sampled_shapley` (antithetic; 64 orders by default)."""
    if permutations is None and game.n <= exact_max:
        values = exact_shapley(game.values, game.n)
        return ShapleyEstimate(values, np.zeros(game.n), 0, 2 ** game.n, True)
    return sampled_shapley(game.values, game.n, seed=seed,
                           permutations=64 if permutations is None else permutations)
