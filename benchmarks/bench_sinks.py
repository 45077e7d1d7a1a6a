"""Benchmark: time and peak memory of sinks + activations probes vs plain, eager and TL forwards.

Each (provider, T) measurement runs in its own fresh Python process (this script re-invoked
with a hidden `--worker` flag), one after another, so that its peak RSS is its own. Results go
to a long CSV (name, provider, x_name, x_value, metric, value, machine); see
benchmarks/README.md for the providers and how to read it.

    python benchmarks/bench_sinks.py --T 256 512 --repeats 1 --out /tmp/bench_sinks.csv
"""
from __future__ import annotations

# The parent process stays on the standard library: a child's ru_maxrss starts from the
# RSS of the process that spawned it (Linux carries the pre-exec high-water mark over), so
# a parent holding torch and a model would set a floor under every measurement.
import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from harness import peak_rss_mb, rss_mb, benchmark_input, machine, write_csv

NAME = "sinks"
PROVIDERS: dict[str, str] = {
    "plain_sdpa": "HF forward, sdpa attention, use_cache=False, logits_to_keep=1 (the baseline)",
    "plain_sdpa_all_logits": "the same with logits at every position (HF's default forward)",
    "tokenprobe_default": "tokenprobe.run(..., ['activations', 'sinks', 'entropy']) (CLI default)",
    "tokenprobe_sinks_activations": "tokenprobe.run(..., ['activations', 'sinks'])",
    "tokenprobe_sinks": "tokenprobe.run(..., ['sinks'])",
    "tokenprobe_sinks_activations_blockwise": "the same as tokenprobe_sinks_activations with "
                                              "the blockwise torch attention statistics "
                                              "(SinksConfig(impl='torch'), the CUDA fallback)",
    "tokenprobe_activations": "tokenprobe.run(..., ['activations'])",
    "tokenprobe_entropy": "tokenprobe.run(..., ['entropy'])",
    "tokenprobe_entropy_lens": "tokenprobe.run(..., [EntropyProbe(EntropyConfig(lens=True))]) "
                               "(the logit lens at every layer)",
    "eager_output_attentions": "HF forward, eager attention, output_attentions=True",
    "transformerlens_run_with_cache": "TransformerLens 4.x TransformerBridge.run_with_cache",
}
PROBES = {"tokenprobe_default": ["activations", "sinks", "entropy"],
          "tokenprobe_sinks_activations": ["activations", "sinks"],
          "tokenprobe_sinks": ["sinks"], "tokenprobe_activations": ["activations"],
          "tokenprobe_sinks_activations_blockwise": ["activations", "sinks:torch"],
          "tokenprobe_entropy": ["entropy"], "tokenprobe_entropy_lens": ["entropy:lens"]}
SLOW = ("eager_output_attentions", "transformerlens_run_with_cache")  # [L, H, T, T] held
BASELINE = "plain_sdpa"


def _prepare(provider: str, loaded: Any, text: str, ids: list[int],
             batch: int) -> tuple[Callable, Callable]:
    """The call to time for `provider` and a check of its output (run once, on the warm-up).

    Baselines run under `torch.inference_mode()` (the best a plain forward can do); tokenprobe
    runs as a user calls it, with autograd in its default state, so a graph that tokenprobe
    builds by mistake shows in its figures."""
    import torch

    import tokenprobe

    model, config = loaded.model, loaded.model.config
    input_ids = torch.tensor([ids] * batch, dtype=torch.long)  # (B, T)
    t = len(ids)
    if provider in ("plain_sdpa", "plain_sdpa_all_logits"):
        if config._attn_implementation != "sdpa":
            raise RuntimeError("the plain baseline expects sdpa attention, the model uses "
                               f"{config._attn_implementation}")
        keep = 0 if provider == "plain_sdpa_all_logits" else 1
        call = _inference(lambda: model(input_ids=input_ids, use_cache=False,
                                        logits_to_keep=keep))
        check = lambda out: _expect(
            tuple(out.logits.shape) == (batch, keep or t, config.vocab_size), "logits")
    elif provider == "eager_output_attentions":
        model.set_attn_implementation("eager")
        call = _inference(lambda: model(input_ids=input_ids, use_cache=False, logits_to_keep=1,
                                        output_attentions=True))
        shape = (batch, config.num_attention_heads, t, t)
        check = lambda out: _expect(out.attentions is not None
                                    and len(out.attentions) == config.num_hidden_layers
                                    and tuple(out.attentions[0].shape) == shape, "attentions")
    elif provider == "transformerlens_run_with_cache":
        from tokenprobe.backends import as_bridge

        bridge = as_bridge(loaded)  # switches this (fresh) model to eager attention
        call = _inference(lambda: bridge.run_with_cache(input_ids))
        check = lambda out: _expect(out[0].shape[:2] == (batch, t) and len(out[1]) > 0,
                                    "TL cache")
    elif provider in PROBES:
        from tokenprobe.probes import EntropyConfig, EntropyProbe, SinksConfig, SinksProbe

        special = {"sinks:torch": lambda: SinksProbe(SinksConfig(impl="torch")),
                   "entropy:lens": lambda: EntropyProbe(EntropyConfig(lens=True))}
        probes = lambda: [special[p]() if p in special else p for p in PROBES[provider]]
        call = lambda: tokenprobe.run(loaded, [text] * batch, probes(), progress=False,
                                      truncate=True, batch_size=batch)

        def check(result: Any) -> None:
            _expect(result.tokens.token_id.tolist() == ids * batch,
                    "tokenprobe saw other token ids")
            _expect(not result.prompts.truncated.any(), "tokenprobe truncated the prompt")
    else:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    return call, check


def _inference(call: Callable) -> Callable:
    def run() -> Any:
        import torch

        with torch.inference_mode():
            return call()
    return run


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"unexpected output: {what}")


def measure(provider: str, tokens: int, repeats: int, model_name: str,
            threads: int | None = None, batch: int = 1) -> dict:
    """Load the model, set `provider` up, warm up once, time `repeats` runs; RSS and times."""
    import gc

    import torch

    import tokenprobe

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = tokenprobe.load(model_name)
    text, ids = benchmark_input(loaded.tokenizer, tokens)
    context = loaded.model.config.max_position_embeddings
    if tokens > context:  # cost only: positions past the trained context are not meaningful
        loaded.model.config.max_position_embeddings = tokens
    call, check = _prepare(provider, loaded, text, ids, batch)
    with torch.inference_mode():
        for p in loaded.model.parameters():  # page the (mmap-backed) weights in before "loaded"
            p.sum()
    gc.collect()
    loaded_rss = rss_mb()
    times = []
    start = time.perf_counter()
    out = call()  # warm-up (timed only with --repeats 0, for runs too long to repeat)
    if repeats == 0:
        times.append(time.perf_counter() - start)
    check(out)
    del out
    gc.collect()
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()  # held until the clock stops, as a user holds what they asked for
        times.append(time.perf_counter() - start)
        del out
        gc.collect()
    return {"provider": provider, "T": tokens, "batch": batch, "loaded_rss_mb": loaded_rss,
            "peak_rss_mb": peak_rss_mb(), "time_min_s": min(times),
            "time_median_s": statistics.median(times), "times_s": times, "context": context,
            "threads": torch.get_num_threads(), "input_ids": _digest(ids)}


def _digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- parent side


def run_worker(provider: str, tokens: int, args: argparse.Namespace) -> tuple[dict | None, str]:
    """One measurement in a fresh process; (result, "") or (None, why it failed)."""
    with tempfile.TemporaryDirectory(prefix="bench_sinks.") as tmp:
        result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "worker.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", provider,
               "--T", str(tokens), "--repeats", str(args.repeats), "--model", args.model,
               "--batch", str(args.batch), "--result", str(result_path)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                log.write(f"\nkilled after --timeout {args.timeout} s\n")
        if rc == 0 and result_path.exists():
            return json.loads(result_path.read_text()), ""
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        return {"provider": provider, "T": tokens, "failed": rc}, tail


def rows_for(results: list[dict], args: argparse.Namespace, where: str) -> list[list]:
    """Long CSV rows: per-measurement metrics, skipped / failed markers, ratios to plain_sdpa."""
    rows = []

    def add(provider: str, tokens: int, metric: str, value: float) -> None:
        rows.append([NAME, provider, "T", tokens, metric, value, where])

    for r in results:
        p, t = r["provider"], r["T"]
        if "skipped" in r:
            add(p, t, "skipped", r["skipped"])
        elif "failed" in r:
            add(p, t, "failed", r["failed"])
        else:
            for metric in ("time_min_s", "time_median_s", "peak_rss_mb", "loaded_rss_mb"):
                add(p, t, metric, round(r[metric], 6 if metric.startswith("time") else 3))
            add(p, t, "extra_rss_mb", round(r["peak_rss_mb"] - r["loaded_rss_mb"], 3))
            add(p, t, "threads", r["threads"])
            add(p, t, "batch", r.get("batch", 1))
            add(p, t, "rounds", r.get("n_rounds", 1))
            if t > r["context"]:
                add(p, t, "beyond_context", r["context"])
    base = {r["T"]: r for r in results if r["provider"] == BASELINE and "time_min_s" in r}
    for r in results:
        b = base.get(r["T"])
        if b is None or r["provider"] == BASELINE or "time_min_s" not in r:
            continue
        ratios = {
            "time_ratio": r["time_median_s"] / b["time_median_s"],
            "time_min_ratio": r["time_min_s"] / b["time_min_s"],
            "peak_rss_ratio": r["peak_rss_mb"] / b["peak_rss_mb"],
            "extra_rss_ratio": ((r["peak_rss_mb"] - r["loaded_rss_mb"])
                                / max(b["peak_rss_mb"] - b["loaded_rss_mb"], 1e-9)),
        }
        for metric, value in ratios.items():
            add(r["provider"], r["T"], metric, round(value, 4))
    return rows


def table(results: list[dict]) -> str:
    """A readable summary: one line per (T, provider)."""
    base = {r["T"]: r for r in results if r["provider"] == BASELINE and "time_min_s" in r}
    head = (f"{'T':>6}  {'provider':<31}{'median s':>10}{'min s':>10}{'peak MB':>10}"
            f"{'loaded MB':>10}{'extra MB':>10}{'x time':>8}{'x peak':>8}{'x extra':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        t, p = r["T"], r["provider"]
        if "time_min_s" not in r:
            status = (f"skipped (T > {r['skipped']})" if "skipped" in r
                      else f"FAILED (return code {r['failed']})")
            lines.append(f"{t:>6}  {p:<31}{status}")
            continue
        extra = r["peak_rss_mb"] - r["loaded_rss_mb"]
        line = (f"{t:>6}  {p:<31}{r['time_median_s']:>10.3f}{r['time_min_s']:>10.3f}"
                f"{r['peak_rss_mb']:>10.0f}{r['loaded_rss_mb']:>10.0f}{extra:>10.0f}")
        b = base.get(t)
        if b is not None and p != BASELINE:
            line += (f"{r['time_median_s'] / b['time_median_s']:>8.2f}"
                     f"{r['peak_rss_mb'] / b['peak_rss_mb']:>8.2f}"
                     f"{extra / max(b['peak_rss_mb'] - b['loaded_rss_mb'], 1e-9):>8.2f}")
        lines.append(line)
    return "\n".join(lines)


def merge(runs: list[dict]) -> list[dict]:
    """One result per (T, provider) from its --rounds worker runs: times pooled (min, median),
    peak and loaded RSS the median over rounds; a failed or skipped round stands for all."""
    merged: dict[tuple[int, str], dict] = {}
    for r in runs:
        key = (r["T"], r["provider"])
        if key in merged and ("failed" in merged[key] or "skipped" in merged[key]):
            continue
        if "time_min_s" not in r or key not in merged:
            merged[key] = {**r, "rounds": [r]} if "time_min_s" in r else r
            continue
        merged[key]["rounds"].append(r)
    for m in merged.values():
        if "rounds" in m:
            rounds = m.pop("rounds")
            times = [t for r in rounds for t in r["times_s"]]
            m.update(time_min_s=min(times), time_median_s=statistics.median(times),
                     peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in rounds),
                     loaded_rss_mb=statistics.median(r["loaded_rss_mb"] for r in rounds),
                     n_rounds=len(rounds))
    return list(merged.values())


def main_parent(args: argparse.Namespace) -> int:
    """Run every (T, provider) measurement in turn, rewriting the CSV after each one.

    With --rounds R the providers of each T run R times, interleaved (baseline, others,
    baseline, others, ...), so that a slow spell of this shared machine hits them alike."""
    providers = sorted(args.providers, key=lambda p: p != BASELINE)  # baseline first per T
    where, out, runs = machine(), Path(args.out), []
    plan = [(t, p) for t in args.T for _ in range(args.rounds) for p in providers]
    for i, (t, p) in enumerate(plan, 1):
        if p in SLOW and t > args.skip_slow_baselines_above:
            runs.append({"provider": p, "T": t, "skipped": args.skip_slow_baselines_above})
            print(f"[{i}/{len(plan)}] T={t} {p}: skipped (above "
                  f"--skip-slow-baselines-above {args.skip_slow_baselines_above})", flush=True)
            write_csv(rows_for(merge(runs), args, where), out)
            continue
        print(f"[{i}/{len(plan)}] T={t} {p} ...", end=" ", flush=True)
        start = time.perf_counter()
        result, log_tail = run_worker(p, t, args)
        runs.append(result)
        if "failed" in result:
            print(f"FAILED (return code {result['failed']}) after "
                  f"{time.perf_counter() - start:.0f} s; last lines of its output:\n{log_tail}",
                  flush=True)
        else:
            print(f"median {result['time_median_s']:.3f} s, peak {result['peak_rss_mb']:.0f} MB "
                  f"({time.perf_counter() - start:.0f} s wall)", flush=True)
        write_csv(rows_for(merge(runs), args, where), out)
    results = merge(runs)
    print(f"\n{machine()}\n{table(results)}\n\nwrote {out}")
    digests = {}
    for r in results:
        digests.setdefault(r["T"], set()).add(r.get("input_ids"))
    if any(len(d - {None}) > 1 for d in digests.values()):
        print("ERROR: providers saw different input ids at the same T", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nProviders:\n" + "\n".join(
            f"  {name:<31} {what}" for name, what in PROVIDERS.items()),
        epilog=textwrap.fill(
            "Each (provider, T) runs in a fresh subprocess, one at a time: one warm-up run, "
               "then --repeats timed runs (min and median reported). Peak memory is the "
               "process's peak RSS (ru_maxrss); loaded_rss_mb is the RSS once the model is "
               "loaded and its weights paged in, so peak - loaded is what the forward adds. "
               "T above the model's context (8192 for smollm2-135m) raises the config limit "
               "and is marked by a 'beyond_context' row: it measures cost, not quality.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768],
                        help="sequence lengths in tokens (default: 2048 8192 32768)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement after one warm-up (default: 3); 0 times "
                             "the single checked run itself (cold: for very long contexts)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh worker runs per (T, provider), interleaved across providers; "
                             "times pooled, peak RSS the median over rounds (default: 1)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS),
                        metavar="PROVIDER", help="subset of the providers above (default: all)")
    parser.add_argument("--out", default="benchmarks/results/bench_sinks.csv",
                        help="long CSV to write, rewritten after every measurement "
                             "(default: benchmarks/results/bench_sinks.csv)")
    parser.add_argument("--skip-slow-baselines-above", type=int, default=2048, metavar="T",
                        help="skip eager_output_attentions and transformerlens_run_with_cache "
                             "above this T (they hold [layers, heads, T, T] tensors); recorded "
                             "as metric 'skipped' (default: 2048)")
    parser.add_argument("--batch", type=int, default=1,
                        help="prompts per call: the benchmark text B times, one batch "
                             "(default: 1); recorded as metric 'batch'")
    parser.add_argument("--model", default="smollm2-135m",
                        help="tokenprobe model name (default: smollm2-135m)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="kill a measurement after this long; recorded as 'failed'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each measurement (default: torch's own "
                             "choice); recorded as metric 'threads'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 0 or min(args.T) < 1 or args.rounds < 1 or args.batch < 1:
        parser.error("--repeats must be >= 0, --rounds and --batch >= 1 and every --T positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if len(args.T) != 1 or not args.result:
            raise SystemExit("--worker takes exactly one --T and a --result path")
        result = measure(args.worker, args.T[0], args.repeats, args.model, args.threads,
                         args.batch)
        Path(args.result).write_text(json.dumps(result))
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
