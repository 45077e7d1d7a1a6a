"""Benchmark: rollout sampling (KV-shared batches) against plain HF `generate`, and one search.

Providers, all sampling at temperature 0.5 from the full distribution (no top-k / top-p), the
same prefixes and exactly `--new-tokens` tokens per continuation (no EOS or stop test, so every
provider does the same work). The prefixes are those a rollout search samples: for each of
`--prefixes` shipped arithmetic tasks, its chat prompt followed by the first
`--trajectory-tokens` tokens of the model's greedy answer, and `--cuts` - 1 shorter ones
(one token less each, as the backward scan walks down a trajectory):

- tokenprobe_jobs: one `tokenprobe.analyses.critical.sampling.sample_jobs` call over all
  prefixes, `--rows` rows per decode batch (what `tokenprobe critical` does with a window of
  prefixes): each trajectory encoded once, rows of different prefixes decoded together;
- tokenprobe_kv_shared: `sample_continuations` per prefix, n rows per batch: the prefix
  encoded once and its cache replicated to the batch;
- hf_generate_batched: `model.generate(do_sample=True)` per prefix on n copies of it, one
  seed per call (the prefix is encoded n times; rollouts are not reproducible one by one);
- hf_generate_all: one `generate` call on n copies of every prefix, left-padded (the most
  HF can batch; the same number of rows per decode step as tokenprobe_jobs when --rows
  covers them all);
- hf_generate_per_seed: one `generate` call per rollout seed (reproducible per rollout).

Then the wall time of one full critical-token search (`critical_search`) on the first shipped
task, with `--search-rollouts` per prefix, twice: with the defaults (windows of prefixes
sampled together) and one prefix at a time (window 1, batches of n). Long CSV (name,
provider, x_name, x_value, metric, value, machine), written with bench_sinks' helpers:

    python benchmarks/bench_rollouts.py --n 16 64 --new-tokens 32 --out results/bench_rollouts.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenprobe
from tokenprobe.analyses.critical import (CriticalConfig, Job, critical_search, load_tasks,
                                          prompt_ids, sample_continuations, sample_jobs,
                                          summary_frame)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_csv

NAME = "rollouts"
TEMPERATURE = 0.5


def kv_shared(model, prefix: list[int], seeds: list[int], length: int) -> int:
    conts = sample_continuations(model, prefix, seeds, temperature=TEMPERATURE,
                                 max_new_tokens=length, batch_size=len(seeds))
    return sum(len(c.ids) for c in conts)


def jobs(model, prefixes: list[list[int]], seeds: list[list[int]], length: int,
         rows: int) -> int:
    conts = sample_jobs(model, [Job(p, s) for p, s in zip(prefixes, seeds)],
                        temperature=TEMPERATURE, max_new_tokens=length, batch_size=rows)
    return sum(len(c.ids) for part in conts for c in part)


def _generate(model, prefixes: list[list[int]], rows: int, seed: int, length: int,
              pad: int) -> int:
    width = max(map(len, prefixes))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes for _ in range(rows)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p)
                         for p in prefixes for _ in range(rows)])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                         temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=length,
                         min_new_tokens=length, pad_token_id=pad)
    return (out.shape[1] - width) * len(ids)


def hf_batched(model, prefix, seeds, length, pad) -> int:
    return _generate(model, [prefix], len(seeds), seeds[0], length, pad)


def hf_per_seed(model, prefix, seeds, length, pad) -> int:
    return sum(_generate(model, [prefix], 1, s, length, pad) for s in seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, nargs="+", default=[8, 16], help="rollouts per prefix")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefixes", type=int, default=2, help="shipped task prompts used")
    p.add_argument("--cuts", type=int, default=2,
                   help="prefixes per task: the trajectory and this many - 1 shorter by a token")
    p.add_argument("--rows", type=int, default=64, help="tokenprobe_jobs rows per decode batch")
    p.add_argument("--trajectory-tokens", type=int, default=48,
                   help="greedy answer tokens appended to each prompt (0: the prompt alone)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per provider, interleaved; the median is reported")
    p.add_argument("--search-rollouts", type=int, default=8, help="0 skips the search")
    p.add_argument("--skip", nargs="*", default=[], help="providers to skip")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("results/bench_rollouts.csv"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = tokenprobe.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tasks = load_tasks("arithmetic")
    prefixes = []
    for task in tasks[:args.prefixes]:
        prompt = prompt_ids(tok, task)
        answer = sample_continuations(model, prompt, [0], temperature=0,
                                      max_new_tokens=args.trajectory_tokens)[0].ids if \
            args.trajectory_tokens else []
        prefixes += [prompt + answer[:len(answer) - c] for c in range(args.cuts)]
    print(f"prefix lengths {[len(x) for x in prefixes]}, {args.new_tokens} new tokens")
    def each(fn):  # one call per prefix
        return lambda seeds, length: sum(fn(p, s, length) for p, s in zip(prefixes, seeds))

    providers = {
        "tokenprobe_jobs": lambda seeds, length: jobs(model, prefixes, seeds, length, args.rows),
        "tokenprobe_kv_shared": each(lambda p, s, n: kv_shared(model, p, s, n)),
        "hf_generate_batched": each(lambda p, s, n: hf_batched(model, p, s, n, pad)),
        "hf_generate_all": lambda seeds, length: _generate(model, prefixes, len(seeds[0]),
                                                           seeds[0][0], length, pad),
        "hf_generate_per_seed": each(lambda p, s, n: hf_per_seed(model, p, s, n, pad))}
    rows, where = [], machine()
    kv_shared(model, prefixes[0], [0, 1], 2)  # warm-up
    hf_batched(model, prefixes[0], [0, 1], 2, pad)
    for n in args.n:
        seeds = [[1000 * i + j for j in range(n)] for i in range(len(prefixes))]
        walls: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for repeat in range(args.repeats):  # providers interleaved, so drift hits them alike
            for name, fn in providers.items():
                if name in args.skip:
                    continue
                start = time.perf_counter()
                tokens = fn(seeds, args.new_tokens)
                walls.setdefault(name, []).append(time.perf_counter() - start)
                counts[name] = tokens
                print(f"n={n:3d} {name:24s} {tokens / walls[name][-1]:8.1f} tok/s  "
                      f"({tokens} tokens, {walls[name][-1]:.1f} s, repeat {repeat + 1})",
                      flush=True)
        rate = {}
        for name, times in walls.items():
            wall = statistics.median(times)
            rate[name] = counts[name] / wall
            rows += [[NAME, name, "n", n, "tokens_per_s", round(rate[name], 2), where],
                     [NAME, name, "n", n, "mean_prefix_tokens",
                      sum(map(len, prefixes)) / len(prefixes), where],
                     [NAME, name, "n", n, "new_tokens", args.new_tokens, where],
                     [NAME, name, "n", n, "wall_s", round(wall, 3), where],
                     [NAME, name, "n", n, "repeats", len(times), where]]
        for ours in ("tokenprobe_jobs", "tokenprobe_kv_shared"):
            for name, value in rate.items():
                if name.startswith("hf_") and ours in rate:
                    speedup = rate[ours] / value
                    rows.append([NAME, ours, "n", n, f"speedup_vs_{name}", round(speedup, 2),
                                 where])
                    print(f"        {ours} over {name}: {speedup:.2f}x")
    searches = {"tokenprobe_critical_search": {},  # the defaults: windows of prefixes
                "tokenprobe_critical_search_window1": {"window": 1,
                                                       "batch_size": args.search_rollouts}}
    for name, settings in searches.items() if args.search_rollouts else ():
        if name in args.skip:
            continue
        config = CriticalConfig(n_rollouts=args.search_rollouts, **settings)
        start = time.perf_counter()
        run = critical_search(loaded, tasks[:1], config, progress=False)
        wall = time.perf_counter() - start
        item = summary_frame(run).iloc[0]
        n_roll = len(run.rollouts)
        n = args.search_rollouts
        rows += [[NAME, name, "n", n, "wall_s", round(wall, 2), where],
                 [NAME, name, "n", n, "window", config.window, where],
                 [NAME, name, "n", n, "batch_size", config.batch_size, where],
                 [NAME, name, "n", n, "prefixes_sampled", int(item.prefixes_sampled), where],
                 [NAME, name, "n", n, "rollouts", n_roll, where],
                 [NAME, name, "n", n, "sampled_tokens", int(run.rollouts.n_tokens.sum()), where],
                 [NAME, name, "n", n, "critical_index", item.critical_index, where]]
        print(f"{name} on {item.task_id} (n={n}, window {config.window}, batch "
              f"{config.batch_size}): {wall:.1f} s, {int(item.prefixes_sampled)} of "
              f"{int(item.trajectory_tokens)} prefixes, {n_roll} rollouts, critical index "
              f"{item.critical_index}, status {item.status}", flush=True)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
