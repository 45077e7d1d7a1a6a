"""Forking tokens on SmolLM2's own answers to the shipped arithmetic task, scored on the
response only (as the 80/20 code's response mask) and over the whole text, against the 80/20
paper's figures (Wang et al., Qwen3-8B on math: 80th-percentile entropy 0.672 nats, over half
of the tokens near zero entropy).

Each task's chat prompt (the task's question and instruction through the chat template) is
answered by smollm2-135m, sampled at temperature 1.0 (the paper's rollout temperature) with
seeds 0..n-1; the (messages, answer) pairs then run through the entropy probe with
`score="response"` and `score="all"`. Prints the figures and writes
results/forking_figures.csv (name, provider, x_name, x_value, metric, value, machine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_csv  # noqa: E402

import tokenprobe  # noqa: E402
from tokenprobe.analyses.critical.sampling import sample_continuations  # noqa: E402
from tokenprobe.analyses.critical.tasks import INSTRUCTION, load_tasks, prompt_ids  # noqa: E402
from tokenprobe.models import eos_ids  # noqa: E402
from tokenprobe.probes import EntropyConfig, EntropyProbe  # noqa: E402

NAME = "forking_figures"
PAPER = {"p80_entropy": 0.672}  # nats, Qwen3-8B (Wang et al., Figure 2a)


def answers(loaded, tasks, *, temperature: float, max_new_tokens: int) -> list[dict]:
    """(messages, sampled answer) records, one answer per task (seed = the task's index)."""
    tok, out = loaded.tokenizer, []
    for i, task in enumerate(tasks):
        [cont] = sample_continuations(loaded.model, prompt_ids(tok, task), [i],
                                      temperature=temperature, max_new_tokens=max_new_tokens,
                                      eos_ids=eos_ids(loaded.model, tok))
        text = tok.decode(cont.ids, skip_special_tokens=True)
        out.append({"id": task.task_id, "messages": [
            {"role": "user", "content": f"{task.question}\n{INSTRUCTION}"},
            {"role": "assistant", "content": text}]})
    return out


def figures(run, label: str) -> dict:
    """Entropy figures of the scored tokens of `run` and its forking tokens."""
    t = run.tokens
    scored = t[t.forking.notna()]
    h = scored.entropy.to_numpy(float)
    fork = scored[scored.forking.astype(bool)]
    words = fork.sort_values("entropy", ascending=False).token.head(12).tolist()
    in_response = (fork.in_response.fillna(False).astype(bool).mean()
                   if "in_response" in fork else float("nan"))
    return {"label": label, "n_scored": len(h), "n_forking": len(fork),
            "forking_share": len(fork) / len(h), "p50_entropy": float(np.quantile(h, 0.5)),
            "p80_entropy": float(np.quantile(h, 0.8)),
            "share_below_0.01": float((h < 0.01).mean()),
            "share_below_0.1": float((h < 0.1).mean()),
            "forking_min_entropy": float(fork.entropy.min()),
            "forking_mean_entropy": float(fork.entropy.mean()),
            "forking_in_response": float(in_response), "top_forking_tokens": words}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--limit", type=int, default=None, help="first N tasks (default all)")
    args = parser.parse_args()
    loaded = tokenprobe.load("smollm2-135m")
    tasks = load_tasks()[:args.limit]
    pairs = answers(loaded, tasks, temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens)
    rows, found = [], []
    for score in ("response", "all"):
        run = tokenprobe.run(loaded, pairs, [EntropyProbe(EntropyConfig(score=score))],
                             progress=False)
        found.append(figures(run, f"score={score}"))
    for f in found:
        print(f"{f['label']}: {f['n_scored']} scored tokens, {f['n_forking']} forking "
              f"({f['forking_share']:.3f}); entropy p50 {f['p50_entropy']:.3f}, p80 "
              f"{f['p80_entropy']:.3f} nats (paper: {PAPER['p80_entropy']}); below 0.01: "
              f"{f['share_below_0.01']:.2f}, below 0.1: {f['share_below_0.1']:.2f}; forking "
              f"min/mean entropy {f['forking_min_entropy']:.3f}/{f['forking_mean_entropy']:.3f};"
              f" forking tokens in the response: {f['forking_in_response']:.2f}")
        print("  top forking tokens:", f["top_forking_tokens"])
        for metric, value in f.items():
            if isinstance(value, float | int) and not isinstance(value, bool):
                rows.append([NAME, f["label"], "tasks", len(tasks), metric, value, machine()])
    write_csv(rows, Path(__file__).resolve().parent / "results" / f"{NAME}.csv")


if __name__ == "__main__":
    main()
