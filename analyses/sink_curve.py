"""Sink rate against context length T (Gu et al., Figure 3): one sinks run per T, one row per T.

Gu et al. report Sink_1^eps at a fixed T = 64 because the rate falls as T grows; this curve
shows how far. Texts shorter than T are not padded: each row says the T actually reached.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

DEFAULT_TS = (16, 32, 64, 128, 256, 512, 1024)
CURVE_COLUMNS = ["model", "T", "T_reached_min", "T_reached_max", "n_prompts", "sink_rate", "eps"]


def long_prose() -> list[str]:
    """The passages of `tokenprobe/data/long_prose.jsonl` (about 65-85 tokens each)."""
    text = resources.files("tokenprobe").joinpath("data/long_prose.jsonl").read_text("utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [i["text"] if isinstance(i, dict) else i for i in items]


def rotated_documents(passages: Sequence[str], *, sep: str = "\n\n",
                      tail: str = "") -> list[str]:
    """One document per passage: all passages joined, starting from that one, then `tail`.

    The shipped passages are far shorter than 1024 tokens; joined they reach about 600 on
    SmolLM2's tokenizer, and rotating the order keeps one text per passage with a different
    first token for each. The default curve adds the shipped story of
    `tokenprobe/data/toy_text.txt` (about 1,500 tokens) as the tail, so T = 1024 is reached.
    """
    n = len(passages)
    end = sep + tail if tail else ""
    return [sep.join(passages[(i + j) % n] for j in range(n)) + end for i in range(n)]


def story() -> str:
    """The prose of `tokenprobe/data/toy_text.txt` (the toy's training text, about 6.8 kB)."""
    return resources.files("tokenprobe").joinpath("data/toy_text.txt").read_text("utf-8")


def toy_texts(model_dir: str | Path, n: int = 8, *, seed: int = 0) -> list[str]:
    """Held-out Bigram-Backcopy sequences of a saved toy model, as text (BOS added by its
    tokenizer), at the model's training length."""
    import tokenprobe
    from tokenprobe.analyses.toy import held_out, load_task

    task, info = load_task(model_dir)
    seqs = held_out(task, n, seed=seed, length=info["config"]["seq_len"])
    tokenizer = tokenprobe.load(str(model_dir)).tokenizer
    return [tokenizer.decode(row[1:].tolist()) for row in seqs]


def sink_rate_curve(model: Any, texts: Sequence[str], Ts: Sequence[int] = DEFAULT_TS, *,
                    name: str | None = None, eps: float | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Sink rate of `model` on `texts` cut to each T in `Ts` (tokenprobe.run, probe "sinks").

    Args:
        model: a loaded model (or anything `tokenprobe.run` accepts).
        texts: the prompts; each is cut to its first T tokens.
        Ts: context lengths; texts past the model's context are cut to it (T_reached says).
        name: the model column (default `model.name` or its class name).
        eps: sink threshold (default the probe's, 0.3).
        progress: a tqdm bar over T.

    Returns:
        One row per T: model, T (asked), T_reached_min / T_reached_max (tokens the texts
        actually had after the cut), n_prompts, sink_rate (% of prompt x layer x head with
        alpha_0 > eps), eps. When no text reaches T, the run equals the previous one and is
        not repeated.
    """
    import tokenprobe
    from tokenprobe.analyses.sinks import sink_rate
    from tqdm.auto import tqdm

    name = name or str(getattr(model, "name", type(model).__name__))
    rows: list[dict] = []
    longest = None  # longest text of the previous run: a larger T changes nothing past it
    for T in tqdm(sorted(Ts), desc=f"sink rate vs T ({name})", disable=not progress):
        if rows and longest is not None and longest < rows[-1]["T"]:
            rows.append({**rows[-1], "T": T})
            continue
        result = tokenprobe.run(model, list(texts), ["sinks"], max_tokens=T,
                                truncate=True, progress=False)
        rate = sink_rate(result, eps=eps, by_prompt=False).iloc[0]
        lengths = result.prompts.n_tokens
        longest = int(lengths.max())
        rows.append({"model": name, "T": T, "T_reached_min": int(lengths.min()),
                     "T_reached_max": longest, "n_prompts": len(lengths),
                     "sink_rate": float(rate.sink_rate), "eps": float(rate.eps)})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def curve_for(model_name: str, Ts: Sequence[int] = DEFAULT_TS, *,
              texts: Sequence[str] | None = None, progress: bool = False) -> pd.DataFrame:
    """`sink_rate_curve` for a registered name or a model directory.

    A toy model directory (one holding `toy.json`) is measured on its own held-out sequences;
    any other model on `texts`, by default `rotated_documents(long_prose(), tail=story())`.
    """
    import tokenprobe

    if (Path(model_name) / "toy.json").exists():
        texts = toy_texts(model_name)
    elif texts is None:
        texts = rotated_documents(long_prose(), tail=story())
    model = tokenprobe.load(model_name)
    return sink_rate_curve(model, texts, Ts, name=Path(model_name).name or model_name,
                           progress=progress)
