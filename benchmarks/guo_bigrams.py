"""One-off conversion: Guo et al.'s tiny-Shakespeare statistics to `tokenprobe/data/*.json`.

Guo et al.'s Bigram-Backcopy training (GuoTianYu2000/Active-Dormant-Attention, BBM/train_main.py)
loads `BBM/data/bos1_d0/meta.pickle` for one BOS and no delimiter; the folder ships the same
meta as plain YAML, `config.yaml` (`cond`: 67 x 67 next-token probabilities, `marginal`: the
unigram, `itos`, `bos: [65]`, `delimiter: 66`). This script reads that YAML with
`yaml.safe_load` and no pickle (the YAML's floats equal, in order, those of that meta.pickle,
listed once with `pickletools.genops`, which parses opcodes and runs nothing), recovers the
integer counts behind the probabilities and writes them with the vocabulary, after checking
that the counts reproduce every one of their float64 probabilities bit for bit:

- unigram counts: marginal x N, N = 1 / (the smallest marginal) = 1,115,394, tiny-Shakespeare's
  length ('$' occurs once);
- bigram counts: cond[i] x (the row's total), the total being the character's count, or one
  less for the text's last character (whose row is one pair short).

    python benchmarks/guo_bigrams.py CONFIG_YAML [--text INPUT_TXT] [--out JSON]

CONFIG_YAML: `git show 16b3593c32a751d6b08df5dd6631a76d9fe7c0c9:BBM/data/bos1_d0/config.yaml`
in a clone of that repository. INPUT_TXT (optional): tiny-Shakespeare itself
(karpathy/char-rnn, data/tinyshakespeare/input.txt); the counts are then also checked against
the text's own (they were equal: 1,115,394 characters, sha256 86c4e6aa...c565ed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

COMMIT = "16b3593c32a751d6b08df5dd6631a76d9fe7c0c9"
N_CHARS = 65


def counts_from_meta(meta: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(chars by id, unigram counts (65,), bigram counts (65, 65)) reproducing `meta` exactly."""
    cond, marginal = np.array(meta["cond"]), np.array(meta["marginal"])
    assert meta["vocab_size"] == N_CHARS + 2 and meta["bos"] == [N_CHARS]
    assert meta["delimiter"] == N_CHARS + 1 and meta["delimiter_p"] == 0
    chars = [meta["itos"][i] for i in range(N_CHARS)]
    assert chars == sorted(set(chars))  # BBM/data/prepare.py: sorted(list(set(data)))
    total = round(1 / marginal[marginal > 0].min())
    unigrams = np.rint(marginal[:N_CHARS] * total).astype(np.int64)
    assert np.array_equal(unigrams / unigrams.sum(), marginal[:N_CHARS])
    bigrams = np.zeros((N_CHARS, N_CHARS), dtype=np.int64)
    for i in range(N_CHARS):
        rows = [cond[i, :N_CHARS] * r for r in (unigrams[i], unigrams[i] - 1)]
        best = min(rows, key=lambda row: np.abs(row - np.rint(row)).max())
        bigrams[i] = np.rint(best)
    assert (cond[:N_CHARS, N_CHARS:] == 0).all()  # nothing is followed by BOS or <d>
    assert np.array_equal(bigrams / bigrams.sum(1, keepdims=True), cond[:N_CHARS, :N_CHARS])
    assert bigrams.sum() == total - 1  # one pair per adjacent two characters
    return chars, unigrams, bigrams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_yaml", type=Path)
    parser.add_argument("--text", type=Path, help="tiny-Shakespeare's input.txt, to check against")
    parser.add_argument("--out", type=Path,
                        default=Path("tokenprobe/data/tiny_shakespeare_bigrams.json"))
    args = parser.parse_args()
    meta = yaml.safe_load(args.config_yaml.read_text("utf-8"))
    chars, unigrams, bigrams = counts_from_meta(meta)
    checked = {}
    if args.text:
        raw = args.text.read_bytes()
        text = raw.decode("utf-8")
        pairs = Counter(zip(text, text[1:]))
        assert sorted(set(text)) == chars
        assert [text.count(ch) for ch in chars] == unigrams.tolist()
        assert [[pairs[a, b] for b in chars] for a in chars] == bigrams.tolist()
        checked = {"checked_against_text": "equal to the counts of input.txt itself (sha256 "
                                           f"{hashlib.sha256(raw).hexdigest()})"}
    header = {
        "what": "character unigram and bigram counts of tiny-Shakespeare, tokenised as Guo et "
                "al.'s Bigram-Backcopy code does: its 65 characters by code point are ids 0-64, "
                "BOS ('<s_0>' there) is 65, the delimiter ('<d>') is 66",
        "text": "tiny-Shakespeare, karpathy/char-rnn data/tinyshakespeare/input.txt (1,115,394 "
                "characters of Shakespeare's plays; char-rnn is MIT-licensed, the plays are in "
                "the public domain)",
        "source": f"GuoTianYu2000/Active-Dormant-Attention@{COMMIT}: BBM/data/bos1_d0/"
                  "config.yaml (cond, marginal, itos), the plain-YAML twin of the meta.pickle "
                  "BBM/train_main.py loads",
        "derivation": "benchmarks/guo_bigrams.py: counts = probabilities x totals; "
                      "counts / row totals reproduce every float64 of cond and marginal exactly",
        **checked, "bos_id": N_CHARS, "delim_id": N_CHARS + 1, "n_text_chars": int(unigrams.sum()),
        "chars": chars, "char_counts": unigrams.tolist(),
    }
    fields = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    rows = ",\n  ".join(json.dumps(row) for row in bigrams.tolist())  # one row per line
    args.out.write_text("{\n" + "\n".join(fields) + f'\n "bigrams": [\n  {rows}\n ]\n}}\n',
                        "utf-8")
    assert json.loads(args.out.read_text("utf-8"))["bigrams"] == bigrams.tolist()
    print(f"wrote {args.out}: {len(chars)} characters, {int(unigrams.sum()):,} in the text")


if __name__ == "__main__":
    main()
