"""A tokenizer's vocabulary as bytes (GPT-2 byte-level BPE, SentencePiece with byte fallback),
sorted for prefix search, and the byte strings' tokenisations: what `tokenprobe.analyses.bytelevel`
enumerates cover encodings over."""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenprobe.tokens import byte_decoder

MAX_TOKENIZATIONS = 20_000  # prune="none": refuse prefixes with more left encodings than this


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The bytes of every token id (len(tokenizer) entries), None for special tokens.

    Byte-level BPE (decoder `ByteLevel`: GPT-2, SmolLM2): each character of a piece stands for
    one byte through GPT-2's byte-to-unicode map. SentencePiece style (decoder replacing '▁'
    by a space, with `ByteFallback`: Gemma 3): '<0xNN>' is the byte NN, '▁' a space, the rest
    the piece's UTF-8. Added tokens that are not special (Gemma's runs of newlines) are their
    own text.

    Raises:
        ValueError: a tokenizer with another decoder, or a piece outside the byte alphabet.
    """
    decoder = json.loads(tokenizer.backend_tokenizer.decoder.__getstate__())
    parts = decoder.get("decoders", [decoder])
    byte_level = any(d["type"] == "ByteLevel" for d in parts)
    if not byte_level and not any(d["type"] == "ByteFallback" for d in parts):
        raise ValueError(f"unsupported tokenizer decoder {decoder['type']!r}: need byte-level "
                         "BPE (ByteLevel) or SentencePiece with byte fallback")
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    table = byte_decoder()

    def piece_bytes(i: int, piece: str | None) -> bytes | None:
        if i in special or piece is None:
            return None
        if i in added:
            return added[i].content.encode()
        if byte_level:
            if not all(ch in table for ch in piece):
                raise ValueError(f"token {i} ({piece!r}) is not in the byte-level alphabet")
            return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()

    ids = list(range(len(tokenizer)))
    return [piece_bytes(i, p) for i, p in zip(ids, tokenizer.convert_ids_to_tokens(ids))]


@dataclass(frozen=True)
class ByteVocab:
    """A vocabulary as bytes, sorted so that the tokens starting with given bytes are one run.

    Attributes:
        pieces: token id -> its bytes, None for specials and logits past the tokenizer (V).
        keys: the bytes of the non-special tokens, sorted (N entries).
        ids: (N,) int64, the token id of each key.
        table: (N, L) int16, byte j of each key, -1 past its end (L: the longest token).
        by_bytes: bytes -> ids with exactly those bytes (several with byte fallback: 'a', <0x61>).
    """

    pieces: tuple[bytes | None, ...]
    keys: tuple[bytes, ...]
    ids: np.ndarray
    table: np.ndarray
    by_bytes: dict[bytes, tuple[int, ...]]

    @property
    def max_len(self) -> int:
        return self.table.shape[1]

    def rows(self, start: bytes, *, longer: bool = False) -> np.ndarray:
        """(R,) rows whose token starts with `start` (with `longer`, strictly longer than it)."""
        lo = bisect.bisect_left(self.keys, start)
        hi = bisect.bisect_right(self.keys, start + b"\xff" * self.max_len)
        if not longer:
            return np.arange(lo, hi)
        if len(start) >= self.max_len:
            return np.arange(0)
        return lo + np.flatnonzero(self.table[lo:hi, len(start)] >= 0)


def byte_vocab(tokenizer: PreTrainedTokenizerBase, size: int | None = None) -> ByteVocab:
    """The `ByteVocab` of a tokenizer (`token_bytes`) for a model with `size` logits
    (default len(tokenizer)); logits past the tokenizer count as specials."""
    pieces = token_bytes(tokenizer)
    size = size or len(pieces)
    pieces = (pieces + [None] * size)[:size]
    order = sorted((p, i) for i, p in enumerate(pieces) if p)
    keys = tuple(p for p, _ in order)
    table = np.full((len(keys), max(map(len, keys))), -1, dtype=np.int16)
    by_bytes: dict[bytes, tuple[int, ...]] = {}
    for row, (piece, i) in enumerate(order):
        table[row, :len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        by_bytes[piece] = by_bytes.get(piece, ()) + (i,)
    ids = np.array([i for _, i in order], dtype=np.int64)
    return ByteVocab(tuple(pieces), keys, ids, table, by_bytes)


def leading_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids the tokenizer puts before a text: [<bos>] for Gemma 3, [] for SmolLM2."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    starts = [k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare]
    return list(full[:starts[0]]) if starts else []


def encode_bytes(tokenizer: PreTrainedTokenizerBase, vocab: ByteVocab,
                 data: bytes) -> tuple[int, ...] | None:
    """The tokenizer's own encoding of `data` (no special tokens). Bytes that end inside a
    UTF-8 character are encoded as their whole characters, then a single-byte token per
    remaining byte (as the authors' `_encode_bytes`). None when `data` is not UTF-8 so cut,
    or its encoding does not give back exactly `data`."""
    try:
        text, tail = data.decode("utf-8"), b""
    except UnicodeDecodeError as err:
        if err.end != len(data) or err.reason != "unexpected end of data":
            return None
        text, tail = data[:err.start].decode("utf-8"), data[err.start:]
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()
    ids += tuple(vocab.by_bytes.get(bytes([b]), (-1,))[0] for b in tail)
    pieces = [vocab.pieces[i] if i >= 0 else None for i in ids]
    return ids if None not in pieces and b"".join(pieces) == data else None


def _tokenizations(data: bytes, vocab: ByteVocab) -> list[tuple[int, ...]]:
    """Every sequence of non-special tokens whose bytes are exactly `data` (exponential)."""
    suffixes: list[list[tuple[int, ...]]] = [[] for _ in data] + [[()]]  # [j]: of data[j:]
    for j in range(len(data) - 1, -1, -1):
        for end in range(j + 1, min(len(data), j + vocab.max_len) + 1):
            for t in vocab.by_bytes.get(data[j:end], ()):
                suffixes[j].extend((t,) + rest for rest in suffixes[end])
        if len(suffixes[j]) > MAX_TOKENIZATIONS:
            raise ValueError(f"prune='none': more than {MAX_TOKENIZATIONS} tokenizations of "
                             f"{len(data) - j} bytes; use a shorter prefix or prune='prefix'")
    return suffixes[0]
