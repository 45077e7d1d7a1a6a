"""Benchmark: rollout sampling (KV-shared batches) against plain HF `generate`, and one search.

Providers, all sampling at temperature 0.5 from the full distribution (no top-k / top-p), the
same prefixes and exactly `--new-tokens` tokens per continuation (no EOS or stop test, so every
provider does the same work). A prefix is a shipped arithmetic task's chat prompt followed by
the first `--trajectory-tokens` tokens of the model's greedy answer, as in a rollout search,
where every prefix is the prompt plus part of a trajectory:

- tokenprobe_kv_shared: `tokenprobe.sampling.sample_continuations`, one seed per rollout, the
  prefix encoded once and its cache replicated to the batch;
- hf_generate_batched: `model.generate(do_sample=True)` on n copies of the prefix, one seed
  per call (the prefix is encoded n times; rollouts are not reproducible one by one);
- hf_generate_per_seed: one `generate` call per rollout seed (reproducible per rollout).

Then the wall time of one full critical-token search (`critical_search`) on the first shipped
task, with `--search-rollouts` per prefix. Long CSV (name, provider, x_name, x_value, metric,
value, machine), written with bench_sinks' helpers:

    python benchmarks/bench_rollouts.py --n 8 16 --new-tokens 32 --out results/bench_rollouts.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import tokenprobe
from tokenprobe.analyses.critical import critical_search, summary_frame
from tokenprobe.probes.critical import CriticalConfig
from tokenprobe.sampling import sample_continuations
from tokenprobe.tasks import load_tasks, prompt_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_csv

NAME = "rollouts"
TEMPERATURE = 0.5


def kv_shared(model, prefix: list[int], seeds: list[int], length: int) -> int:
    conts = sample_continuations(model, prefix, seeds, temperature=TEMPERATURE,
                                 max_new_tokens=length, batch_size=len(seeds))
    return sum(len(c.ids) for c in conts)


def _generate(model, prefix: list[int], rows: int, seed: int, length: int, pad: int) -> int:
    ids = torch.tensor([prefix] * rows)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=length,
                         min_new_tokens=length, pad_token_id=pad)
    return (out.shape[1] - len(prefix)) * rows


def hf_batched(model, prefix, seeds, length, pad) -> int:
    return _generate(model, prefix, len(seeds), seeds[0], length, pad)


def hf_per_seed(model, prefix, seeds, length, pad) -> int:
    return sum(_generate(model, prefix, 1, s, length, pad) for s in seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, nargs="+", default=[8, 16], help="rollouts per prefix")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefixes", type=int, default=2, help="shipped task prompts used")
    p.add_argument("--trajectory-tokens", type=int, default=48,
                   help="greedy answer tokens appended to each prompt (0: the prompt alone)")
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
        prefixes.append(prompt + answer)
    print(f"prefix lengths {[len(x) for x in prefixes]}, {args.new_tokens} new tokens")
    providers = {"tokenprobe_kv_shared": lambda pr, s, n: kv_shared(model, pr, s, n),
                 "hf_generate_batched": lambda pr, s, n: hf_batched(model, pr, s, n, pad),
                 "hf_generate_per_seed": lambda pr, s, n: hf_per_seed(model, pr, s, n, pad)}
    rows, where = [], machine()
    kv_shared(model, prefixes[0], [0, 1], 2)  # warm-up
    hf_batched(model, prefixes[0], [0, 1], 2, pad)
    for n in args.n:
        rate = {}
        for name, fn in providers.items():
            if name in args.skip:
                continue
            start, tokens = time.perf_counter(), 0
            for i, prefix in enumerate(prefixes):
                tokens += fn(prefix, [1000 * i + j for j in range(n)], args.new_tokens)
            wall = time.perf_counter() - start
            rate[name] = tokens / wall
            rows += [[NAME, name, "n", n, "tokens_per_s", round(rate[name], 2), where],
                     [NAME, name, "n", n, "mean_prefix_tokens",
                      sum(map(len, prefixes)) / len(prefixes), where],
                     [NAME, name, "n", n, "new_tokens", args.new_tokens, where],
                     [NAME, name, "n", n, "wall_s", round(wall, 3), where]]
            print(f"n={n:3d} {name:24s} {rate[name]:8.1f} tok/s  ({tokens} tokens, {wall:.1f} s)",
                  flush=True)
        for name, value in rate.items():
            if name != "tokenprobe_kv_shared" and "tokenprobe_kv_shared" in rate:
                speedup = rate["tokenprobe_kv_shared"] / value
                rows.append([NAME, "tokenprobe_kv_shared", "n", n, f"speedup_vs_{name}",
                             round(speedup, 2), where])
                print(f"        speed-up over {name}: {speedup:.2f}x")
    if args.search_rollouts:
        config = CriticalConfig(n_rollouts=args.search_rollouts, batch_size=args.search_rollouts)
        start = time.perf_counter()
        run = critical_search(loaded, tasks[:1], config, progress=False)
        wall = time.perf_counter() - start
        item = summary_frame(run).iloc[0]
        n_roll = len(run.rollouts)
        rows += [[NAME, "tokenprobe_critical_search", "n", args.search_rollouts, "wall_s",
                  round(wall, 2), where],
                 [NAME, "tokenprobe_critical_search", "n", args.search_rollouts,
                  "prefixes_sampled", int(item.prefixes_sampled), where],
                 [NAME, "tokenprobe_critical_search", "n", args.search_rollouts, "rollouts",
                  n_roll, where],
                 [NAME, "tokenprobe_critical_search", "n", args.search_rollouts,
                  "sampled_tokens", int(run.rollouts.n_tokens.sum()), where]]
        print(f"critical search on {item.task_id} (n={args.search_rollouts}): {wall:.1f} s, "
              f"{int(item.prefixes_sampled)} of {int(item.trajectory_tokens)} prefixes, "
              f"{n_roll} rollouts, status {item.status}")
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
