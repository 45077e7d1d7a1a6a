"""One prepared device check: the Triton attention statistics on CUDA, checked and timed.

No GPU has been lent to this project's sessions so far, so `kernels/attention_triton.py` has
only run under TRITON_INTERPRET=1. A session that is lent one runs this script once (the
device tool's machine has torch, triton, transformers and pandas, and no network):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && \\
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.csv

1. Correctness: `attention_with_stats(impl="triton")` against the float64 full-matrix
   reference (`impl="reference"`) at SmolLM2-135M's attention shape (9 heads, 3 KV heads,
   head dim 64) and at Gemma 3 270M's (4 heads, 1 KV head, 256), fp32 and bf16, with right
   padding, softcapping and k_pos 0 and 2 (the cases of kernels/cases.py). Worst error:
   max |got - ref| / (1 + |ref|) over outputs and statistics, against the CPU tests'
   tolerances (1e-4 fp32, 2e-2 bf16). `tokenprobe selftest --device cuda --full` checks
   every op this way; this script adds the timing against sdpa.
2. Speed, per layer at each --T: torch's sdpa forward (`is_causal=True`, the plain model's
   attention) against the Triton forward + column pass, as a ratio. The whole-model ratio of the
   issue is about 1 + (ratio - 1) x (attention's share of the forward).

Here (no GPU) `--device cpu` runs the same under TRITON_INTERPRET=1 at small shapes, which is
how the script itself is tested. Writes the long CSV of the other benchmarks.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_csv

NAME = "gpu_check"


def check(device, t) -> list[tuple[str, float, float]]:
    """(case, worst error over outputs and stats, tolerance) per case (the selftest's cases)."""
    import torch

    from tokenprobe.kernels.cases import MODELS, attention_case

    results = []
    for model, s in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for softcap, k_pos in ((None, 0), (None, 2), (30.0, 0)):
                case = attention_case(f"{model} {str(dtype).split('.')[-1]} softcap={softcap} "
                                      f"k_pos={k_pos}", s.heads, s.kv_heads, s.head_dim, t,
                                      dtype, device, softcap=softcap, k_pos=k_pos)
                errors = case.errors(case.run("triton"), case.run("reference"))
                results.append((case.label, max(errors.values()), case.tol))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (the check this is for) or cpu under TRITON_INTERPRET=1")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths timed (default: 2048 "
                   "8192 32768 on cuda, 16 on cpu)")
    p.add_argument("--check-T", type=int, help="length of the correctness cases (default: 1024 "
                   "on cuda, 13 on cpu)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.csv"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from tokenprobe.kernels.selfcheck import unchecked

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --device cpu for the interpreted run", file=sys.stderr)
        return 2
    lengths_t = args.T or ([2048, 8192, 32768] if args.device == "cuda" else [16])
    check_t = args.check_T or (1024 if args.device == "cuda" else 13)
    where = f"{machine()}; {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
    with unchecked():  # the kernels as they are: no first-use self-check, no fallback
        rows, failed = measure(args, check_t, lengths_t, where)
    write_csv(rows, args.out)
    print(f"wrote {args.out}; {failed} correctness case(s) failed")
    return 1 if failed else 0


def measure(args, check_t, lengths_t, where) -> tuple[list[list], int]:
    """The CSV rows (the correctness cases, then the timings) and the number of failed cases."""
    import torch

    from tokenprobe.kernels.attention import attention_with_stats
    from tokenprobe.kernels.cases import MODELS, attention_inputs
    from tokenprobe.kernels.selfcheck import time_call

    rows, failed = [], 0
    for case, worst, tol in check(args.device, check_t):
        ok = worst <= tol
        failed += not ok
        rows.append([NAME, "triton_vs_reference", "case", case, "max_error", worst, where])
        print(f"{'ok  ' if ok else 'FAIL'} {case}: max error {worst:.2e} (tolerance {tol:g})",
              flush=True)
    for t in lengths_t:
        s = MODELS["smollm2-135m"]
        q, k, v, mask, lengths = attention_inputs(
            s.heads, s.kv_heads, t, s.head_dim,
            torch.bfloat16 if args.device == "cuda" else torch.float32, [t], args.device)
        groups = s.heads // s.kv_heads
        sdpa = time_call(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True),
            args.device, args.repeats)
        stats = time_call(lambda: attention_with_stats(q, k, v, None, lengths, impl="triton",
                                                       scaling=s.head_dim ** -0.5),
                          args.device, args.repeats)
        rows += [[NAME, "sdpa_causal", "T", t, "time_s", sdpa, where],
                 [NAME, "tokenprobe_triton_stats", "T", t, "time_s", stats, where],
                 [NAME, "tokenprobe_triton_stats", "T", t, "time_ratio", stats / sdpa, where]]
        print(f"T={t}: sdpa {sdpa * 1e3:.3f} ms, triton forward + statistics "
              f"{stats * 1e3:.3f} ms ({stats / sdpa:.2f}x)", flush=True)
    return rows, failed


if __name__ == "__main__":
    sys.exit(main())
