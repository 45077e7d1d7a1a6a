"""Figures for tokenprobe's sink-label variants and attn_received_norm on the embedded models.

Runs the sinks probe with its default settings on paragraphs of tokenprobe/data/long_prose.jsonl
and prints, per model: how many tokens after the candidates each criterion labels primary,
secondary, sink_like, noise or none (Wong et al.'s `sinks` table beside tokenprobe's
`sink_labels` criteria raw, centered, nomassive), the median and 90th percentile of max |cos|,
the sink-like tokens and their layers, the positions with the highest attn_received and
attn_received_norm, and the run's diagnostics. Not a test and not a timing: nothing is asserted.

    python benchmarks/sink_variants_figures.py                  # first paragraph, both models
    python benchmarks/sink_variants_figures.py --paragraphs 9 --models smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import math
from importlib import resources

import numpy as np
import pandas as pd

import tokenprobe

KINDS = ["primary", "secondary", "sink_like", "noise", "none"]


def paragraphs(n: int) -> list[str]:
    """The first n texts of tokenprobe/data/long_prose.jsonl."""
    lines = (resources.files("tokenprobe") / "data" / "long_prose.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def label_counts(run, after: int) -> pd.DataFrame:
    """Rows: `sinks (Wong et al.)` and each sink_labels criterion; columns: the kinds (tokens
    past position `after`), then median and p90 of max |cos| over those tokens (NaN for
    `sinks`, which has max_cos only for the tokens it lists: criterion raw is the same cosine
    over every token)."""
    tokens = run.tokens[run.tokens.pos > after]
    paper = run.sinks[run.sinks.pos > after]
    rows = {"sinks (Wong et al.)": {**paper.kind.value_counts().to_dict(),
                                    "none": len(tokens) - len(paper),
                                    "max_cos_median": np.nan, "max_cos_p90": np.nan}}
    labels = run.sink_labels[run.sink_labels.pos > after]
    for criterion, frame in labels.groupby("criterion"):
        rows[criterion] = {**frame.kind.value_counts().to_dict(),
                           "max_cos_median": frame.max_cos.median(),
                           "max_cos_p90": frame.max_cos.quantile(0.9)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    counts = out.reindex(columns=KINDS).fillna(0).astype(int)
    return counts.join(out[["max_cos_median", "max_cos_p90"]].round(3))


def received_peaks(run, after: int, top: int = 5) -> pd.DataFrame:
    """Per prompt and column (attn_received, attn_received_norm): the `top` positions by the
    mean over layers, and in how many layers the argmax past `after` lies in the last 10%."""
    rows = []
    for prompt_id, frame in run.token_layers.groupby("prompt_id"):
        n = int(frame.pos.max()) + 1
        tail = n - math.ceil(n / 10)
        for column in ("attn_received", "attn_received_norm"):
            mean = frame.groupby("pos")[column].mean()
            wide = frame[frame.pos > after].pivot(index="layer", columns="pos", values=column)
            late = int((wide.idxmax(axis=1) >= tail).sum())
            best = mean.sort_values(ascending=False).head(top)
            rows.append({"prompt_id": prompt_id, "T": n, "column": column,
                         "top positions (mean over layers)": ", ".join(
                             f"{p} ({v:.3g})" for p, v in best.items()),
                         "layers peaking in last 10%": f"{late} of {len(wide)}"})
    return pd.DataFrame(rows)


def sink_like(run) -> pd.DataFrame:
    """The sink_like tokens of each criterion with the layers of their run."""
    labels = run.sink_labels
    like = labels[labels.kind == "sink_like"]
    return like[["criterion", "prompt_id", "pos", "token", "sink_like_first", "sink_like_last",
                 "lifetime"]].sort_values(["criterion", "prompt_id", "pos"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--paragraphs", type=int, default=1,
                        help="how many paragraphs of long_prose.jsonl (default 1)")
    args = parser.parse_args()
    texts = paragraphs(args.paragraphs)
    pd.set_option("display.width", 200, "display.max_colwidth", 80, "display.max_rows", 200)
    for name in args.models:
        loaded = tokenprobe.load(name)
        run = tokenprobe.run(loaded, texts, ["sinks"], progress=False)
        config = run.meta["probes"][0]
        after = max(config["candidates"])
        n_layers = loaded.model.config.num_hidden_layers
        print(f"\n=== {name}: {len(texts)} paragraph(s), T = "
              f"{', '.join(map(str, run.prompts.n_tokens))}, {n_layers} layers, default "
              f"settings (cos_threshold {config['cos_threshold']}, primary_margin "
              f"{config['primary_margin']}, massive_top_k {config['massive_top_k']}, "
              f"sink_like_min {config['sink_like_min']})")
        print(f"\ntokens after the candidates (pos > {after}) by label and criterion:")
        print(label_counts(run, after).to_string())
        print("\nsink_like tokens:")
        found = sink_like(run)
        print(found.to_string(index=False) if len(found) else "  none")
        print("\nattention received: highest positions")
        print(received_peaks(run, after).to_string(index=False))
        print("\ndiagnostics:")
        for note in run.meta.get("diagnostics", {}).get("sinks", []):
            print(f"  - {note}")


if __name__ == "__main__":
    main()
