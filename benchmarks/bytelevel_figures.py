"""Per-word next-byte JSD between SmolLM2-135M and Gemma 3 270M on a sentence, for the note.

Prints, at each word start, the log-prob each model gives the word's first byte, both
entropies and the JSD (nats), and the wall time; with --canonical N, the first N word starts
again under the authors' canonical pruning (its cost, and how far it moves the JSD). Not a
test: it asserts nothing.

    .venv/bin/python benchmarks/bytelevel_figures.py ["a sentence"] [--canonical 3]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import tokenprobe
from tokenprobe.analyses import bytelevel as bl

SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm red mat."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=SENTENCE)
    parser.add_argument("--canonical", type=int, default=0, metavar="N",
                        help="rerun the first N word starts with the authors' canonical pruning "
                             "(slow: a tokenizer call per candidate token)")
    args = parser.parse_args()
    start = time.perf_counter()
    smol, gemma = tokenprobe.load("smollm2-135m"), tokenprobe.load("gemma3-270m")
    loaded = time.perf_counter()
    frame = bl.byte_divergence(smol.model, smol.tokenizer, gemma.model, gemma.tokenizer,
                               args.text)
    done = time.perf_counter()
    words = args.text.encode().split()
    print(f"{'word':<10} {'logp_smol':>9} {'logp_gem':>9} {'H_smol':>7} {'H_gem':>7} "
          f"{'jsd':>6} {'kl_sg':>6}")
    for word, row in zip(words, frame.itertuples()):
        print(f"{word.decode():<10} {row.logp_a:9.3f} {row.logp_b:9.3f} {row.entropy_a:7.3f} "
              f"{row.entropy_b:7.3f} {row.jsd:6.3f} {row.kl_ab:6.3f}")
    print(f"mean JSD over {frame.jsd.notna().sum()} word starts: {frame.jsd.mean():.3f} nats "
          f"(ln 2 = {math.log(2):.3f}); kl_gs is inf: SmolLM2 has no token for 21 bytes")
    print(f"load {loaded - start:.1f} s, byte_divergence {done - loaded:.1f} s "
          f"({len(args.text.encode())} bytes, {len(frame)} word starts, "
          f"{torch.get_num_threads()} threads)")
    if args.canonical:
        first = frame.iloc[:args.canonical]
        canon = bl.byte_divergence(smol.model, smol.tokenizer, gemma.model, gemma.tokenizer,
                                   args.text, positions=first.byte_offset.tolist(),
                                   prune="canonical")
        shift = (canon.jsd.values - first.jsd.values)
        print(f"canonical pruning, {len(first)} word starts: {time.perf_counter() - done:.1f} s,"
              f" JSD change {', '.join(f'{d:+.4f}' for d in shift)} nats")


if __name__ == "__main__":
    main()
