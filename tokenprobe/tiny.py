"""Seeded tiny random models (`tiny-llama`, `tiny-gemma3`) for fast unit tests.

Each tiny model is a real transformers architecture built with `from_config` and a
fixed seed, paired with a byte-level tokenizer (256 byte tokens + `<pad>`, `<bos>`,
`<eos>`). `tiny-llama` adds no BOS, like SmolLM2; `tiny-gemma3` adds `<bos>`, like
Gemma 3, and has a sliding window shorter than typical test prompts.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIALS = ("<pad>", "<bos>", "<eos>")
VOCAB_SIZE = len(SPECIALS) + 256
SEED = 1234


def byte_tokenizer(*, add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, specials first (pad=0, bos=1, eos=2)."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def _llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _gemma3() -> PreTrainedModel:
    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma3ForCausalLM(config)


TINY = {"tiny-llama": (_llama, False), "tiny-gemma3": (_gemma3, True)}


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the seeded tiny model `name` (a key of `TINY`) and its tokenizer."""
    make, add_bos = TINY[name]
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = make()
        # Random init leaves activations tiny and uniform; scale the residual writers
        # up so layers differ visibly and the statistics are not all near zero.
        for name_, p in model.named_parameters():
            if name_.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.mul_(8.0)
    return model.eval(), byte_tokenizer(add_bos=add_bos)
