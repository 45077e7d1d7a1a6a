"""Corpus scale: peak RSS and tokens/s of `tokenprobe run` against the corpus' size, opening a
finished run, and 1 against 2 Ray workers, with a plain forward's throughput as the baseline.

Every measurement runs in a fresh child process (its own peak RSS, ru_maxrss), on the same
deterministic corpus (a .jsonl of prompts of 16 to 128 tokens of natural text, read lazily with
`tokenprobe.corpus.Corpus`), smollm2-135m, fp32, CPU, default probes, `max_tokens=128`.

Providers:
  plain_forward    model(input_ids, attention_mask, use_cache=False, logits_to_keep=1) over
                   the same batches (by length within windows of 256, batch 8): the baseline
  tokenprobe_run   tokenprobe.run(loaded, Corpus([file]), out=DIR, max_tokens=128)
  open_query       in a new process: open_run(DIR) and a first query (count and mean entropy
                   of `tokens` through tokenprobe.query), peak RSS
  ray_1, ray_2     tokenprobe.engine_ray.run_ray with 1 and 2 workers on a local Ray cluster
                   (num_cpus=2; the driver's RSS only, so peak_rss is not comparable there)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PARAGRAPHS, machine, peak_rss_mb, write_csv  # noqa: E402

NAME = "bench_corpus"
MODEL = "smollm2-135m"


def make_corpus(path: Path, n: int) -> None:
    """`n` prompts: windows of the benchmark paragraphs, 12 to 100 words (deterministic)."""
    words = " ".join(PARAGRAPHS).split()
    with path.open("w") as f:
        for i in range(n):
            start, length = (i * 37) % (len(words) - 100), 12 + (i * 13) % 89
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(words[start:start + length])})
                    + "\n")


def worker(provider: str, corpus: Path, out: Path, threads: int) -> dict:
    import tokenprobe

    if provider == "open_query":  # what a notebook or `tokenprobe query` pays: no torch
        from tokenprobe.query import query

        start = time.perf_counter()
        run = tokenprobe.open_run(out)
        row = query("SELECT count(*) AS n, avg(entropy) AS h FROM tokens", [out]).iloc[0]
        assert "torch" not in sys.modules
        return {"seconds": time.perf_counter() - start, "tokens": int(row.n),
                "n_prompts": run.meta["n_prompts"]}
    import torch

    from tokenprobe.corpus import Corpus

    torch.set_num_threads(threads)
    loaded = tokenprobe.load(MODEL)
    if provider == "plain_forward":
        return plain(loaded, Corpus([corpus]))
    start = time.perf_counter()
    if provider == "tokenprobe_run":
        run = tokenprobe.run(loaded, Corpus([corpus]), out=out, max_tokens=128, progress=False,
                             overwrite=True)
    else:
        import ray

        from tokenprobe.engine_ray import run_ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run = run_ray(MODEL, Corpus([corpus]), workers=int(provider.split("_")[1]), out=out,
                      max_tokens=128, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    tokens = int(run.dataset("tokens").count_rows())
    return {"seconds": seconds, "tokens": tokens}


def plain(loaded, corpus) -> dict:
    import torch

    from tokenprobe.runner import windows
    from tokenprobe.tokens import pad_batch

    tok, tokens, start = loaded.tokenizer, 0, time.perf_counter()
    with torch.inference_mode():
        for part in windows(corpus, 256):
            ids = sorted((tok(p.text)["input_ids"][:128] for p in part), key=len)
            for i in range(0, len(ids), 8):
                rows = ids[i:i + 8]
                input_ids, mask = pad_batch(rows, tok.pad_token_id or 0, torch.device("cpu"))
                loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                             logits_to_keep=1)
                tokens += sum(map(len, rows))
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def measure(provider: str, corpus: Path, out: Path, threads: int, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", provider,
                           "--corpus", str(corpus), "--run-dir", str(out),
                           "--threads", str(threads)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{provider} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800, 3200],
                        help="corpus sizes in prompts (default 50 200 800 3200)")
    parser.add_argument("--plain-size", type=int, default=800,
                        help="prompts of the plain-forward baseline (default 800)")
    parser.add_argument("--ray-size", type=int, default=200,
                        help="prompts for the 1 vs 2 Ray worker runs (0: skip; default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{NAME}.csv"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.corpus, args.run_dir, args.threads)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return 0
    rows, where = [], machine()
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(args.plain_size, "plain_forward")] + [
            (n, p) for n in args.sizes for p in ("tokenprobe_run", "open_query")]
        if args.ray_size:
            plan += [(args.ray_size, p) for p in ("plain_forward", "ray_1", "ray_2")]
        for n, provider in plan:
            corpus = Path(tmp) / f"corpus_{n}.jsonl"
            if not corpus.exists():
                make_corpus(corpus, n)
            got = measure(provider, corpus, Path(tmp) / f"run_{n}_{provider.startswith('ray')}",
                          args.threads, args.timeout)
            print(f"{provider:15s} n={n:5d}: {json.dumps(got)}", flush=True)
            rows.append([NAME, provider, "n_prompts", n, "peak_rss_mb", round(got["peak_rss_mb"], 1),
                         where])
            if provider != "open_query":
                rows.append([NAME, provider, "n_prompts", n, "tokens_per_s",
                             round(got["tokens"] / got["seconds"], 1), where])
            rows.append([NAME, provider, "n_prompts", n, "seconds", round(got["seconds"], 2), where])
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
