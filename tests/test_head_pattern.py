"""One head's attention pattern (analyses/head_pattern.py) against eager attention."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenprobe.analyses import head_pattern as hp
from tokenprobe.models import LoadedModel

PROMPT = "the cat sat on the mat and the dog sat on the rug.\nThen it rained."


def eager_attentions(loaded: LoadedModel, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """The oracle: every layer's (1, H, T, T) weights from transformers' eager attention.

    (transformers 5.24 ignores `attn_implementation="eager"` as a forward argument, so the
    model is switched to eager and back.)"""
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


def check_heads(loaded: LoadedModel, ids: list[int], atol: float, *,
                every: bool = True) -> None:
    """head_pattern == eager at every head (`every`), else at every head of layer 0 (cheap:
    the forward stops there) and one head each of the middle and last layers."""
    reference = eager_attentions(loaded, ids)
    n_layers = loaded.model.config.num_hidden_layers
    assert len(reference) == n_layers
    for layer, weights in enumerate(reference):
        n_heads = weights.shape[1]
        heads = (range(n_heads) if every or layer == 0 else [1] if layer == n_layers // 2
                 else [n_heads - 1] if layer == n_layers - 1 else [])
        for head in heads:
            pattern = hp.head_pattern(loaded, ids, layer, head)
            assert pattern.shape == (len(ids), len(ids)) and pattern.dtype == np.float32
            np.testing.assert_allclose(pattern, weights[0, head].numpy(), atol=atol,
                                       err_msg=f"layer {layer} head {head}")
            np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
            assert not np.triu(pattern, 1).any()  # causal


def test_head_probs_against_float64_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    scores = q @ k.T * 0.3
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -math.inf)
    expected = torch.exp(scores - scores.amax(-1, keepdim=True))
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(hp.head_probs(q, k, None, scaling=0.3), expected)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    window = causal & ~causal.tril(-3)  # the last 3 keys up to the query
    windowed = hp.head_probs(q.float(), k.float(), window, scaling=0.3, softcap=2.0)
    assert windowed.dtype == torch.float32
    assert (windowed[~window] == 0).all() and torch.allclose(windowed.sum(-1), torch.ones(7))
    capped = torch.tanh(q @ k.T * 0.3 / 2.0) * 2.0
    assert windowed[6, 4:].double().log().diff().allclose(capped[6, 4:].diff(), atol=1e-5)


def test_tiny_llama_matches_eager_gqa(tiny_llama):
    config = tiny_llama.model.config
    assert config.num_attention_heads > config.num_key_value_heads  # GQA: 2 heads per kv head
    check_heads(tiny_llama, tiny_llama.tokenizer(PROMPT)["input_ids"], atol=1e-5)
    assert config._attn_implementation == "sdpa"  # switched back


def test_tiny_gemma3_matches_eager_with_sliding_window(tiny_gemma3):
    ids = tiny_gemma3.tokenizer(PROMPT)["input_ids"]
    window = tiny_gemma3.model.config.sliding_window
    assert len(ids) > 4 * window and ids[0] == tiny_gemma3.tokenizer.bos_token_id
    check_heads(tiny_gemma3, ids, atol=1e-5)
    layer_types = tiny_gemma3.model.config.layer_types
    sliding = hp.head_pattern(tiny_gemma3, ids, layer_types.index("sliding_attention"), 0)
    full = hp.head_pattern(tiny_gemma3, ids, layer_types.index("full_attention"), 0)
    assert (np.count_nonzero(sliding, axis=-1) <= window).all()  # keys outside the window: 0
    assert np.count_nonzero(full[-1]) == len(ids)


def test_stops_after_the_layer_and_checks_its_arguments(tiny_llama):
    ids = tiny_llama.tokenizer("Hello there")["input_ids"]
    ran = []
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, block in enumerate(tiny_llama.model.model.layers)]
    try:
        hp.head_pattern(tiny_llama, ids, 1, 3)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0]  # layer 1's attention ended the forward; layer 2 never ran
    with pytest.raises(ValueError, match=r"no head \(3, 0\) in a model with 3 layers x 4 heads"):
        hp.head_pattern(tiny_llama, ids, 3, 0)
    with pytest.raises(ValueError, match="no head"):
        hp.head_pattern(tiny_llama, ids, 0, 4)
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_refuses_prompts_over_512_tokens(tiny_llama):
    ids = [5] * (hp.MAX_TOKENS + 1)
    with pytest.raises(hp.PromptTooLong, match="513 tokens.*up to 512 tokens"):
        hp.head_pattern(tiny_llama, ids, 0, 0)
    assert hp.head_pattern(tiny_llama, ids[:hp.MAX_TOKENS], 0, 0).shape == (512, 512)
    with pytest.raises(ValueError, match="no tokens"):
        hp.head_pattern(tiny_llama, [], 0, 0)


def test_figure_and_query_frame_mark_the_sink():
    pattern = np.tril(np.full((3, 3), 1.0)) / np.arange(1, 4)[:, None]
    fig = hp.pattern_figure(pattern, ["<s>", "a", "b"], title="t", sinks={0: "sink key (k_pos)"})
    assert list(fig.data[0].x) == ["0:<s>", "1:a", "2:b"] == list(fig.data[0].y)
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(-0.5, 0.5)]
    assert fig.layout.annotations[0].text == "sink key (k_pos)"
    import pandas as pd
    tokens = pd.DataFrame({"pos": [0, 1, 2], "shown": ["<s>", "a", "b"]})
    frame = hp.query_frame(tokens, pattern, 1)
    assert frame.value.tolist()[:2] == [0.5, 0.5] and math.isnan(frame.value[2])


@pytest.mark.embedded
def test_smollm2_matches_eager(smollm2):
    ids = smollm2.tokenizer("The capital of France is Paris. The capital of Spain is")["input_ids"]
    check_heads(smollm2, ids, atol=1e-4, every=False)
