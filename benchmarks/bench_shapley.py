"""Shapley attribution cost: batched coalition scoring against single forwards, and the
standard error that permutation sampling reaches per CPU second.

One process, smollm2-135m, fp32, CPU; a 12-word decision prompt split into word units
(`split_units(kind="word")`), target the contrast log p(" yes") - log p(" no")
(`resolve_target(options=...)`; both options are one token, so UnitGame scores one row per
coalition).

Providers:
  unit_game_batched   UnitGame(batch_size=16).values on a fixed set of random coalitions
                      (16 rows, i.e. 8 coalitions x 2 options, per forward)
  plain_loop          the baseline: the same coalitions as a plain loop, one unpadded HF
                      forward per coalition and option with every position's logits and a
                      float64 log-softmax (what a script without tokenprobe does)
  single_forwards     UnitGame(batch_size=1): tokenprobe's scoring one row per forward (the
                      options of a one-token contrast share a row; last logits only)
  sampled_shapley     sampled_shapley(game.values, 12, permutations=2 * pairs) (antithetic) on
                      a fresh game per budget: mean se over units, process CPU seconds
                      (time.process_time, all threads), and the se scaled to one CPU minute,
                      se * sqrt(cpu_s / 60) (what the same sampler reaches with a minute of CPU;
                      constant when se falls as 1 / sqrt(cost))
  sampled_plain       the same with antithetic=False and as many orders (the baseline sampler)

Torch runs on --threads threads (default 2, this machine's cores; on a shared machine a
2-thread forward slows down far more than a 1-thread one when another process competes).

(a) runs interleaved rounds (the order of the two providers alternates); each round times both
on fresh games (no memo hits) and the CSV has each round's passes per second (coalitions scored
per wall second), the median speedups of the batched game over the plain loop and over
batch_size 1, and the largest value difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_csv  # noqa: E402

NAME = "bench_shapley"
MODEL = "smollm2-135m"
PROMPT = "Is the sky blue on a clear day? Answer yes or no:"
OPTIONS = (" yes", " no")
SIZES = {"unit_game_batched": 16, "single_forwards": 1, "plain_loop": None}  # rows / forward


def timed_values(make_game, coalitions: np.ndarray) -> tuple[float, np.ndarray]:
    """(wall seconds, values) of a fresh game scoring `coalitions`."""
    game = make_game()
    start = time.perf_counter()
    values = game.values(coalitions)
    return time.perf_counter() - start, values


class PlainLoop:
    """The baseline: `values` of coalitions by one unpadded forward per (coalition, option)."""

    def __init__(self, game) -> None:
        self.game = game

    def values(self, coalitions: np.ndarray) -> np.ndarray:
        import torch

        model, out = self.game.loaded.model, []
        with torch.inference_mode():
            for row in coalitions:
                seq, total = self.game.sequence(row), 0.0
                for opt, sign in self.game.target.options():
                    logits = model(input_ids=torch.tensor([seq + list(opt)])).logits[0]
                    logp = torch.log_softmax(logits.double(), -1)
                    total += sign * sum(float(logp[len(seq) - 1 + k, t]) for k, t in
                                        enumerate(opt))
                out.append(total)
        return np.array(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--coalitions", type=int, default=64,
                        help="random coalitions of the throughput comparison (default 64)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the throughput comparison (default 5)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32],
                        help="antithetic pairs of the se budgets (default 4 8 16 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapley.csv"))
    args = parser.parse_args(argv)

    import torch

    import tokenprobe
    from tokenprobe.analyses.attribution_shapley import UnitGame, sampled_shapley
    from tokenprobe.analyses.attribution_targets import resolve_target
    from tokenprobe.analyses.attribution_units import split_units

    torch.set_num_threads(args.threads)
    loaded = tokenprobe.load(MODEL)
    ids, units = split_units(loaded.tokenizer, PROMPT, "word")
    target = resolve_target(loaded, ids, options=OPTIONS)
    n, where, rows = len(units), machine(), []
    print(f"{n} units, {len(ids)} tokens, target {target.describe()}", flush=True)

    def game(batch_size: int = 16) -> UnitGame:
        return UnitGame(loaded, ids, units, target, batch_size=batch_size)

    rng = np.random.default_rng(0)
    pool = np.unique(rng.random((4 * args.coalitions, n)) < 0.5, axis=0)
    coalitions = pool[rng.permutation(len(pool))[:args.coalitions]]  # distinct, (C, n)
    timed_values(game, coalitions[:4])  # warm-up
    ratios, gaps = [], []
    for r in range(args.rounds):
        order = list(SIZES)[::1 if r % 2 == 0 else -1]
        got = {}
        for provider in order:
            size = SIZES[provider]
            got[provider] = timed_values(
                (lambda: PlainLoop(game())) if size is None else (lambda: game(size)),
                coalitions)
            rate = len(coalitions) / got[provider][0]
            rows.append([NAME, provider, "round", r, "passes_per_s", round(rate, 2), where])
            print(f"round {r} {provider:18s} {rate:7.2f} coalitions/s", flush=True)
        ratios.append({b: got[b][0] / got["unit_game_batched"][0]
                       for b in ("plain_loop", "single_forwards")})
        gaps.append(max(float(np.abs(got[b][1] - got["unit_game_batched"][1]).max())
                        for b in ("plain_loop", "single_forwards")))
    for base in ("plain_loop", "single_forwards"):
        ratio = statistics.median(r[base] for r in ratios)
        rows.append([NAME, "unit_game_batched", "coalitions", len(coalitions),
                     f"median_speedup_vs_{base}", round(ratio, 2), where])
        print(f"median speedup over {base}: {ratio:.2f}x", flush=True)
    rows.append([NAME, "unit_game_batched", "coalitions", len(coalitions),
                 "max_abs_value_diff", f"{max(gaps):.2e}", where])
    print(f"max |diff| {max(gaps):.1e}", flush=True)

    for pairs in args.pairs:
        for provider, antithetic in [("sampled_shapley", True), ("sampled_plain", False)]:
            g = game()
            start = time.process_time()
            est = sampled_shapley(g.values, n, permutations=2 * pairs, seed=0,
                                  antithetic=antithetic)
            cpu = time.process_time() - start
            se, per_minute = float(est.se.mean()), float(est.se.mean() * np.sqrt(cpu / 60))
            for metric, value in [("mean_se", f"{se:.4g}"), ("cpu_s", round(cpu, 2)),
                                  ("evaluations", est.evaluations),
                                  ("se_at_one_cpu_minute", f"{per_minute:.4g}")]:
                rows.append([NAME, provider, "pairs", pairs, metric, value, where])
            print(f"{provider:15s} {pairs:3d} pairs: mean se {se:.4f} nats, {cpu:6.1f} cpu s, "
                  f"{est.evaluations} coalitions, se at 1 cpu min {per_minute:.4f}", flush=True)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
