"""Corpus speed: `tokenprobe.run` with the default probes against a plain forward with all
logits, over the same batches, and the share of the run spent building tables.

smollm2-135m, fp32, CPU. Each setting is B prompts a batch, T tokens a prompt (windows of the
benchmark paragraphs, cut to T tokens; the same token ids for every provider):

  8x128    16 prompts of 128 tokens, batch 8 (the corpus setting of issue 22)
  32x64    64 prompts of 64 tokens, batch 32
  1x2048   1 prompt of 2048 tokens (only with --long)

Providers:
  plain_forward_all_logits  model(input_ids, attention_mask, use_cache=False) under
                            torch.inference_mode(), logits at every position (HF's default
                            forward; no logits_to_keep), the same padded batches as the run
  tokenprobe_run            tokenprobe.run(loaded, texts, batch_size=B, max_tokens=T,
                            progress=False): activations + sinks + entropy, tables in memory,
                            TOKENPROBE_COMPILE=0 (the entropy sweep's plain tile step)
  tokenprobe_run_compiled   the same with TOKENPROBE_COMPILE=1: full tiles through the
                            torch.compile'd step; its first compile happens in the warm-up and
                            is reported on its own (compile_seconds)

Time: one child process per setting loads the model once, warms the providers up, then runs
them interleaved (their order alternating from repeat to repeat) and reports the medians;
time_ratio_to_plain is the median over repeats of each repeat's ratio (its runs are next to
each other, so a slow spell of the machine moves both).
Table building is the time inside the probes' `collect` (the per-batch tables), timed in the
same runs; `runner_tables` adds the runner's conform / join / merge_parts of those tables and
its `prompts` and `tokens` tables (prompt_tables). `finish` is the run's end, once a run
whatever its size: the run-level statistics and summaries in DuckDB, the run-level columns,
the parts merged (RunWriter.finish).
Peak memory: one fresh child process per (setting, provider) runs the provider once over the
setting's prompts and reports its ru_maxrss (model loading included, the same for both).

Metrics (long CSV, name corpus_speed): seconds, tokens_per_s, time_ratio_to_plain (goal
1.25), collect_seconds, table_share (collect / run), runner_tables_seconds,
runner_tables_share, all_tables_share (collect + runner tables, the per-batch table building;
goal < 0.03), finish_seconds, finish_share, peak_rss_mb, rss_loaded_mb,
peak_rss_ratio_to_plain.

    python benchmarks/bench_corpus_speed.py --repeats 5
"""
from __future__ import annotations

# The parent stays on the standard library: a child's ru_maxrss starts from its parent's RSS.
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PARAGRAPHS, machine, peak_rss_mb, rss_mb, write_csv  # noqa: E402

NAME = "corpus_speed"
MODEL = "smollm2-135m"
PLAIN, RUN, COMPILED = "plain_forward_all_logits", "tokenprobe_run", "tokenprobe_run_compiled"
PROVIDERS = (PLAIN, RUN, COMPILED)
SETTINGS = {"8x128": (8, 128, 16), "32x64": (32, 64, 64), "1x2048": (1, 2048, 1)}  # B, T, n


def prompts(tokenizer, tokens: int, n: int) -> list[str]:
    """`n` texts of the benchmark paragraphs, each a window of `tokens` ids at its own offset,
    decoded (a text may re-tokenise a little longer; `max_tokens` and the plain forward cut
    both to `tokens`)."""
    unit = "\n\n".join(PARAGRAPHS) + "\n\n"
    per_unit = len(tokenizer(unit, add_special_tokens=False)["input_ids"])
    ids = tokenizer(unit * (tokens // per_unit + 3), add_special_tokens=False)["input_ids"]
    span = len(ids) - tokens
    return [tokenizer.decode(ids[(i * 37) % span:(i * 37) % span + tokens]) for i in range(n)]


class Setting:
    """A setting's model, texts and the padded batches the plain forward runs (those of
    `tokenprobe.run`: sorted by length, right-padded)."""

    def __init__(self, key: str, threads: int) -> None:
        import torch

        import tokenprobe
        from tokenprobe.tokens import pad_batch

        torch.set_num_threads(threads)
        self.batch, self.tokens, n = SETTINGS[key]
        self.loaded = tokenprobe.load(MODEL)
        tok = self.loaded.tokenizer
        self.texts = prompts(tok, self.tokens, n)
        ids = sorted((tok(t)["input_ids"][:self.tokens] for t in self.texts), key=len)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.padded = [pad_batch(ids[i:i + self.batch], pad, torch.device("cpu"))
                       for i in range(0, len(ids), self.batch)]
        self.n_tokens = sum(map(len, ids))

    def plain(self) -> int:
        import torch

        with torch.inference_mode():
            for input_ids, mask in self.padded:
                self.loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return self.n_tokens

    def run(self, compiled: bool = False) -> int:
        import os

        import tokenprobe

        os.environ["TOKENPROBE_COMPILE"] = "1" if compiled else "0"
        run = tokenprobe.run(self.loaded, self.texts, batch_size=self.batch,
                             max_tokens=self.tokens, progress=False)
        return len(run.tokens)


def timed_sections() -> dict[str, float]:
    """Accumulate the seconds spent in the probes' `collect`, in the runner's table assembly
    (conform, join, merge_parts and prompt_tables as the runner calls them) and in the run's
    finish into the returned dict."""
    from tokenprobe import runner
    from tokenprobe.probes import ActivationsProbe, EntropyProbe, SinksProbe
    from tokenprobe.store import RunWriter

    spent = {"collect": 0.0, "runner_tables": 0.0, "finish": 0.0}

    def wrap(owner, attr: str, section: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[section] += time.perf_counter() - start

        setattr(owner, attr, timed)

    for probe_class in (ActivationsProbe, SinksProbe, EntropyProbe):  # the default suite
        wrap(probe_class, "collect", "collect")
    for attr in ("conform", "join", "merge_parts", "prompt_tables"):
        wrap(runner, attr, "runner_tables")
    wrap(RunWriter, "finish", "finish")  # calls the store's own merge_parts, not the runner's
    return spent


def time_worker(key: str, repeats: int, threads: int) -> dict:
    setting = Setting(key, threads)
    spent = timed_sections()
    calls = {PLAIN: setting.plain, RUN: setting.run, COMPILED: lambda: setting.run(True)}
    counts = {p: calls[p]() for p in PROVIDERS}  # warm-up, and the tokens each one saw
    from tokenprobe.kernels.linear_entropy import COMPILE_SECONDS

    compile_seconds = sum(COMPILE_SECONDS.values())
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"the providers saw different tokens: {counts}")
    seconds = {p: [] for p in PROVIDERS}
    sections = {s: [] for s in spent}
    for rep in range(repeats):
        for provider in PROVIDERS if rep % 2 == 0 else PROVIDERS[::-1]:
            before = dict(spent)
            start = time.perf_counter()
            calls[provider]()
            seconds[provider].append(time.perf_counter() - start)
            if provider == RUN:
                for s in spent:
                    sections[s].append(spent[s] - before[s])
    return {"tokens": counts[RUN], "seconds": seconds, "sections": sections,
            "compile_seconds": compile_seconds}


def memory_worker(key: str, provider: str, threads: int) -> dict:
    setting = Setting(key, threads)
    loaded = rss_mb()
    setting.plain() if provider == PLAIN else setting.run(provider == COMPILED)
    return {"rss_loaded_mb": loaded, "peak_rss_mb": peak_rss_mb()}


def child(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows_of(key: str, timing: dict, memory: dict[str, dict], where: str) -> list[list]:
    median = {p: statistics.median(v) for p, v in timing["seconds"].items()}
    sections = {s: statistics.median(v) for s, v in timing["sections"].items()}
    shares = {s: statistics.median(t / r for t, r in zip(v, timing["seconds"][RUN]))
              for s, v in timing["sections"].items()}
    out = []

    def add(provider: str, metric: str, value: float, digits: int = 3) -> None:
        out.append([NAME, provider, "batch_x_tokens", key, metric, round(value, digits), where])

    for p in PROVIDERS:
        add(p, "seconds", median[p])
        add(p, "tokens_per_s", timing["tokens"] / median[p], 1)
        add(p, "time_ratio_to_plain", statistics.median(
            t / plain for t, plain in zip(timing["seconds"][p], timing["seconds"][PLAIN])))
        add(p, "peak_rss_mb", memory[p]["peak_rss_mb"], 1)
        add(p, "rss_loaded_mb", memory[p]["rss_loaded_mb"], 1)
        add(p, "peak_rss_ratio_to_plain",
            memory[p]["peak_rss_mb"] / memory[PLAIN]["peak_rss_mb"])
    add(RUN, "collect_seconds", sections["collect"], 4)
    add(RUN, "table_share", shares["collect"], 4)
    add(RUN, "runner_tables_seconds", sections["runner_tables"], 4)
    add(RUN, "runner_tables_share", shares["runner_tables"], 4)
    add(RUN, "all_tables_share", statistics.median(
        (c + t) / r for c, t, r in zip(timing["sections"]["collect"],
                                       timing["sections"]["runner_tables"],
                                       timing["seconds"][RUN])), 4)
    add(RUN, "finish_seconds", sections["finish"], 4)
    add(RUN, "finish_share", shares["finish"], 4)
    add(RUN, "repeats", len(timing["seconds"][RUN]), 0)
    add(COMPILED, "compile_seconds", timing["compile_seconds"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each provider per setting, after one warm-up "
                             "(default 5; medians are reported)")
    parser.add_argument("--settings", nargs="+", default=["8x128", "32x64"],
                        choices=list(SETTINGS), help="settings BxT (default 8x128 32x64)")
    parser.add_argument("--long", action="store_true",
                        help="add the 1x2048 setting (one prompt of 2048 tokens; slow on CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds before a child process is stopped (default 1800)")
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{NAME}.csv"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "time":
        print(json.dumps(time_worker(args.setting, args.repeats, args.threads)))
        return 0
    if args.worker:
        print(json.dumps(memory_worker(args.setting, args.worker, args.threads)))
        return 0
    settings = list(dict.fromkeys(args.settings + ["1x2048"] * args.long))
    rows, where = [], machine()
    for key in settings:
        common = ["--setting", key, "--threads", str(args.threads)]
        timing = child(["--worker", "time", "--repeats", str(args.repeats), *common],
                       args.timeout)
        memory = {p: child(["--worker", p, *common], args.timeout) for p in PROVIDERS}
        found = rows_of(key, timing, memory, where)
        for row in found:
            print(f"{key:7s} {row[1]:26s} {row[4]:24s} {row[5]}", flush=True)
        rows += found
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
