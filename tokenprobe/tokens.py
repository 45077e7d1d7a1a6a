"""Tokenisation for runs: validation, context checks, readable token text, padded batches."""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase


class PromptError(ValueError):
    """A prompt cannot be run as given; the message says which and why."""


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def display_text(text: str) -> str:
    """`text` safe to print on a terminal or page: every character that is not printable
    (C0 and C1 controls such as ESC, BEL, NUL and CR, DEL, newlines and tabs, bidi and other
    format characters, non-space separators) as an escape: \\n, \\t, \\r, \\xNN or \\uNNNN.
    Printable text, the plain space included, is unchanged."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else _ESCAPES.get(ch) or
        (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
         else f"\\U{ord(ch):08x}")
        for ch in text)


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The readable text of one token (the `token` columns): `raw_token_text` with control
    characters escaped (`display_text`), so it never drives a terminal."""
    return display_text(raw_token_text(tokenizer, token_id))


def raw_token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The exact text of one token (the `token_raw` column); a piece that is not whole UTF-8
    characters (a byte of a multi-byte character) reads as its bytes, \\xNN escapes."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = byte_decoder()
    if all(ch in table for ch in piece):  # byte-level BPE piece
        return bytes(table[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
    if piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return f"\\x{piece[3:-1].lower()}"
    return piece


def token_rows(tokenizer: PreTrainedTokenizerBase, prompts: list[tuple[int, list[int]]]
               ) -> pd.DataFrame:
    """The `tokens` rows of sequences given as (prompt_id, token ids), in that order, as one
    table: prompt_id, pos, token_id, token (readable), token_raw (exact), is_special. Each
    distinct id is decoded once."""
    ids = [i for _, seq in prompts for i in seq]
    raw = {i: raw_token_text(tokenizer, i) for i in set(ids)}
    special = set(tokenizer.all_special_ids)
    shown = {i: display_text(text) for i, text in raw.items()}
    lengths = [len(seq) for _, seq in prompts]
    return pd.DataFrame({
        "prompt_id": np.repeat(np.array([p for p, _ in prompts], dtype=np.int64), lengths),
        "pos": [pos for n in lengths for pos in range(n)],
        "token_id": ids, "token": [shown[i] for i in ids], "token_raw": [raw[i] for i in ids],
        "is_special": [i in special for i in ids]})


def check_nonempty(prompts: list[str], ids: list[int] | None = None) -> None:
    """Raise `PromptError` for the first prompt that is not text or is whitespace only (named
    by its id in `ids`, default its index)."""
    for i, text in zip(ids if ids is not None else range(len(prompts)), prompts):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"prompt {i} is empty or whitespace only; give each prompt some text")


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                   context_length: int | None, truncate: bool, max_tokens: int | None = None,
                   ids: list[int] | None = None) -> list[tuple[list[int], bool]]:
    """Token ids of each prompt with the tokenizer's default special tokens, and whether it
    was truncated (cut to `max_tokens` or to the context). Empty or whitespace-only prompts and
    over-long prompts (unless `truncate`) raise `PromptError`, naming the prompt by its id in
    `ids` (default: its index). `max_tokens` keeps only the first tokens of every prompt
    (special tokens included), as Gu et al. cut inputs to T = 64 for the sink rate."""
    prompt_ids = ids if ids is not None else list(range(len(prompts)))
    check_nonempty(prompts, prompt_ids)
    return [_fit(tokenizer(text)["input_ids"], i, context_length=context_length,
                 truncate=truncate, max_tokens=max_tokens) for i, text in zip(prompt_ids, prompts)]


def encode_scored(tokenizer: PreTrainedTokenizerBase, prompts: list, *,
                  context_length: int | None, truncate: bool, max_tokens: int | None = None,
                  rendered: list[tuple[str, str | None, bool]] | None = None
                  ) -> list[tuple[list[int], bool, int | None]]:
    """`encode_prompts` for `tokenprobe.corpus.Prompt`s, with where each response starts.

    A prompt with a response is tokenised as its text (default special tokens) followed by the
    response's tokens (none added), as a model's sampled answer follows its prompt; chat
    messages are first rendered by the tokenizer's chat template (`render`). Returns (token
    ids, truncated, response_start): the position of the response's first token (at most the
    kept length), None without a response. `rendered`: the prompts' `render` results, when
    the caller has them already."""
    out = []
    rendered = rendered or [render(tokenizer, prompt) for prompt in prompts]
    for prompt, (text, response, templated) in zip(prompts, rendered):
        head = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        tail = [] if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]
        ids, cut = _fit(head + tail, prompt.prompt_id, context_length=context_length,
                        truncate=truncate, max_tokens=max_tokens)
        out.append((ids, cut, None if response is None else min(len(head), len(ids))))
    return out


def render(tokenizer: PreTrainedTokenizerBase, prompt) -> tuple[str, str | None, bool]:
    """(the text before the response, the response or None, whether the text came from the
    chat template) of a `tokenprobe.corpus.Prompt`. Chat messages are rendered with the
    generation prompt; a last "assistant" message is the response (its content only, no
    end-of-turn token). PromptError when the tokenizer has no chat template."""
    if prompt.messages is None:
        return prompt.text, prompt.response, False
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"prompt {prompt.prompt_id} is chat messages and this model's "
                          "tokenizer has no chat template; give a text and a response instead "
                          '({"prompt": ..., "response": ...})')
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    response = None
    if messages[-1]["role"] == "assistant":
        response = messages.pop()["content"]
    if not messages:
        raise PromptError(f"prompt {prompt.prompt_id} is one assistant message: give the "
                          "messages it answers before it")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, response, True


def _fit(ids: list[int], prompt_id: int, *, context_length: int | None, truncate: bool,
         max_tokens: int | None) -> tuple[list[int], bool]:
    """`ids` cut to `max_tokens` and to the context (PromptError if too long and not
    `truncate`), and whether they were cut."""
    shortened = max_tokens is not None and len(ids) > max_tokens
    if shortened:
        ids = ids[:max_tokens]
    cut = context_length is not None and len(ids) > context_length
    if cut and not truncate:
        raise PromptError(
            f"prompt {prompt_id} has {len(ids)} tokens, more than the model's context of "
            f"{context_length}; shorten it or ask for truncation (--truncate / truncate=True)")
    return (ids[:context_length] if cut else ids), cut or shortened


def pad_batch(rows: list[list[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (B, T) `input_ids` and `attention_mask` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)
