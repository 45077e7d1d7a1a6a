"""Benchmark: the streaming linear-entropy op against materialised logits and the bare matmul.

The question (CPU fp32 here; CUDA when present): what does `linear_entropy` cost, in time and
extra peak memory, to give every per-token statistic of the entropy probe (entropy, target
logprob and rank, top-2, self-certainty) from final hidden states (T, D) and the unembedding
(V, D), against
- `matmul`: the bare unembedding `hidden @ W.T` (the time baseline: no statistic at all), and
- `materialised`: the obvious code, full logits then `log_softmax` and the statistics
  (the memory baseline).
Goals: extra peak memory <= 256 MB (against ~4.3 GB of fp32 logits for gemma3-270m at T=4096)
and time <= 1.1x the bare matmul.

The inputs are real: a `--prepare` subprocess runs the model once on the benchmark text and
saves the final-normed hidden states, the unembedding and the target ids as safetensors; every
measurement then runs in a fresh process that loads only those, so its peak RSS is the op's own
(plus the inputs, reported as `loaded_rss_mb`). The time ratio to the matmul comes from one
more process that loads the inputs once and runs the providers interleaved (their order
alternating from repeat to repeat; medians, `time_interleaved_s`), so that the machine's drift
between processes stays out of it. Long CSV like bench_sinks.py (see README).

    python benchmarks/bench_entropy.py --model gemma3-270m --T 512 4096 --out /tmp/bench_entropy.csv
"""
from __future__ import annotations

# Parent side: standard library only (a child's ru_maxrss starts from its parent's RSS).
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import peak_rss_mb, rss_mb, benchmark_input, machine, write_csv

NAME = "entropy"
PROVIDERS = {
    "matmul": "hidden @ W.T only (fp32 logits materialised; the time baseline)",
    "materialised": "logits, log_softmax, entropy, logprob, rank, top-2, self-certainty the "
                    "obvious way (the memory baseline)",
    "linear_entropy_torch": "tokenprobe.kernels.linear_entropy(impl='torch'), same statistics",
    "linear_entropy_triton": "tokenprobe.kernels.linear_entropy(impl='triton') (CUDA only)",
    "linear_entropy_torch_grad_weight": "the same as linear_entropy_torch, called outside "
                                        "inference mode with a weight that requires grad, as a "
                                        "probe calls it with the model's own unembedding",
}
TIME_BASE, MEMORY_BASE = "matmul", "materialised"


def prepare(model_name: str, tokens: int, path: Path) -> None:
    """Run the model once; save final-normed hidden states (T-1, D), W (V, D), targets (T-1,)."""
    import torch
    from safetensors.torch import save_file

    import tokenprobe

    loaded = tokenprobe.load(model_name)
    _, ids = benchmark_input(loaded.tokenizer, tokens)
    with torch.inference_mode():
        hidden = loaded.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
    head = loaded.model.get_output_embeddings()
    save_file({"hidden": hidden[:-1].contiguous(), "weight": head.weight.detach().contiguous(),
               "targets": torch.tensor(ids[1:])}, str(path))


def load_inputs(path: Path, device: str):
    """hidden (T, D), weight (V, D), targets (T,) on `device`, paged in."""
    from safetensors.torch import load_file

    inputs = {k: v.to(device) for k, v in load_file(str(path)).items()}
    for v in inputs.values():  # page the memory-mapped inputs in before `loaded_rss_mb` (a
        v.sum()                # copy would put them in memory twice and set a false peak)
    return inputs["hidden"], inputs["weight"], inputs["targets"]


def provider_calls(hidden, weight, targets) -> dict:
    """Each provider's call on the inputs."""
    import torch

    from tokenprobe.kernels.linear_entropy import linear_entropy

    def materialised():
        logits = hidden @ weight.T  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        target = logits.gather(1, targets[:, None])
        return {"entropy": -(p * logp).sum(-1), "logprob": logp.gather(1, targets[:, None]),
                "rank": 1 + (logits > target).sum(-1), "top": logp.topk(2, dim=-1),
                "self_certainty": -(logp.mean(-1) + torch.log(torch.tensor(float(p.shape[-1]))))}

    calls = {
        "matmul": lambda: hidden @ weight.T,
        "materialised": materialised,
        "linear_entropy_torch": lambda: linear_entropy(hidden, weight, targets=targets, topk=2,
                                                       impl="torch"),
        "linear_entropy_triton": lambda: linear_entropy(hidden, weight, targets=targets, topk=2,
                                                        impl="triton"),
    }
    calls["linear_entropy_torch_grad_weight"] = calls["linear_entropy_torch"]
    return calls


def interleaved(providers: list[str], path: Path, repeats: int, device: str) -> dict:
    """Median seconds of each provider, all in this process, interleaved (the grad provider,
    which changes the weight, is left out)."""
    import torch

    hidden, weight, targets = load_inputs(path, device)
    calls = provider_calls(hidden, weight, targets)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    order = [p for p in providers if not p.endswith("_grad_weight")]
    times = {p: [] for p in order}
    with torch.inference_mode():
        for p in order:  # warm-up
            calls[p]()
        sync()
        for rep in range(repeats):
            for p in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                calls[p]()
                sync()
                times[p].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}


def measure(provider: str, path: Path, repeats: int, device: str) -> dict:
    import gc

    import torch

    hidden, weight, targets = load_inputs(path, device)
    cuda = device.startswith("cuda")
    calls = provider_calls(hidden, weight, targets)
    grad = provider.endswith("_grad_weight")
    if grad:
        weight.requires_grad_(True)
    call = calls[provider]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    loaded_rss = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded_gpu = torch.cuda.memory_allocated() / 2**20
    times = []
    with torch.inference_mode(not grad):  # the grad provider runs as a probe does, autograd on
        out = call()  # warm-up
        sync()
        del out
        for _ in range(repeats):
            start = time.perf_counter()
            out = call()
            sync()
            times.append(time.perf_counter() - start)
            del out
            gc.collect()
    result = {"provider": provider, "loaded_rss_mb": loaded_rss, "peak_rss_mb": peak_rss_mb(),
              "time_min_s": min(times), "time_median_s": statistics.median(times),
              "threads": torch.get_num_threads(), "T": int(hidden.shape[0]) + 1,
              "V": int(weight.shape[0]), "D": int(weight.shape[1])}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["loaded_gpu_mb"] = loaded_gpu
    return result


def worker(args: list[str], timeout: float | None) -> tuple[dict | None, str]:
    with tempfile.TemporaryDirectory(prefix="bench_entropy.") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args,
                               "--result", str(out)], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text()), ""
        return None, (proc.stdout + proc.stderr)[-3000:]


def rows_for(results: list[dict], where: str) -> list[list]:
    rows = []
    for r in results:
        x = f"{r['model']}:T={r['T']}"
        def add(metric, value):
            rows.append([NAME, r["provider"], "model_T", x, metric, value, where])
        if "failed" in r:
            add("failed", r["failed"])
            continue
        extra = r["peak_rss_mb"] - r["loaded_rss_mb"]
        for metric in ("time_min_s", "time_median_s", "peak_rss_mb", "loaded_rss_mb", "threads"):
            add(metric, round(r[metric], 6))
        add("extra_rss_mb", round(extra, 3))
        if "peak_gpu_mb" in r:
            add("extra_gpu_mb", round(r["peak_gpu_mb"] - r["loaded_gpu_mb"], 3))
        same = {p["provider"]: p for p in results if p.get("model") == r["model"]
                and p["T"] == r["T"] and "failed" not in p}
        if "time_interleaved_s" in r:
            add("time_interleaved_s", round(r["time_interleaved_s"], 6))
        if TIME_BASE in same and r["provider"] != TIME_BASE:
            key = "time_interleaved_s" if "time_interleaved_s" in r else "time_median_s"
            add("time_ratio_to_matmul", round(r[key] / same[TIME_BASE][key], 4))
        if MEMORY_BASE in same and r["provider"] != MEMORY_BASE:
            base = same[MEMORY_BASE]
            add("extra_rss_ratio_to_materialised",
                round(extra / max(base["peak_rss_mb"] - base["loaded_rss_mb"], 1e-9), 4))
    return rows


def providers_of(args) -> list[str]:
    return [p for p in args.providers
            if p != "linear_entropy_triton" or args.device.startswith("cuda")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Providers:\n" + "\n".join(f"  {k:<23} {v}" for k, v in PROVIDERS.items()))
    parser.add_argument("--model", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 4096],
                        help="tokens of the benchmark text (default: 512 4096)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (triton needs cuda)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--out", default="benchmarks/results/bench_entropy.csv")
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.T[0], Path(args.inputs))
        Path(args.result).write_text("{}")
        return 0
    if args.worker == "interleaved":
        result = interleaved(providers_of(args), Path(args.inputs), args.repeats, args.device)
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.worker:
        result = measure(args.worker, Path(args.inputs), args.repeats, args.device)
        Path(args.result).write_text(json.dumps(result))
        return 0
    providers = providers_of(args)
    where, results = machine(), []
    with tempfile.TemporaryDirectory(prefix="bench_entropy_inputs.") as tmp:
        for model in args.model:
            for t in args.T:
                inputs = Path(tmp) / f"{model}-{t}.safetensors"
                _, log = worker(["--prepare", model, "--T", str(t), "--inputs", str(inputs)],
                                args.timeout)
                if not inputs.exists():
                    print(f"{model} T={t}: preparing inputs failed:\n{log}", file=sys.stderr)
                    return 1
                for p in providers:
                    print(f"{model} T={t} {p} ...", end=" ", flush=True)
                    r, log = worker(["--worker", p, "--inputs", str(inputs), "--repeats",
                                     str(args.repeats), "--device", args.device], args.timeout)
                    if r is None:
                        print(f"FAILED\n{log}", flush=True)
                        r = {"provider": p, "T": t, "failed": 1}
                    else:
                        print(f"median {r['time_median_s']:.3f} s, extra peak "
                              f"{r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} MB", flush=True)
                    results.append({**r, "model": model, "T": t})
                timed, log = worker(["--worker", "interleaved", "--inputs", str(inputs),
                                     "--repeats", str(args.repeats), "--device", args.device,
                                     "--providers", *providers], args.timeout)
                if timed is None:
                    print(f"interleaved timing FAILED\n{log}", flush=True)
                for r in results:
                    if timed and r["model"] == model and r["T"] == t and r["provider"] in timed:
                        r["time_interleaved_s"] = timed[r["provider"]]
                write_csv(rows_for(results, where), Path(args.out))
    print(f"\n{where}")
    for r in results:
        if "failed" not in r:
            print(f"{r['model']:<14}{r['T']:>6}  {r['provider']:<23}{r['time_median_s']:>9.3f} s"
                  f"{r['peak_rss_mb'] - r['loaded_rss_mb']:>9.0f} MB extra")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
