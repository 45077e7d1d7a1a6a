"""The sinks probe against eager attention (explicit softmax over the full masked matrix)."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import block_outputs

import tokenprobe
from tokenprobe.attention import zero_tuning
from tokenprobe.probes.sinks import SinksConfig, SinksProbe, secondary_sinks, sink_levels_of

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi!",
           "the cat sat on the mat and the dog sat on the rug.\nThen it rained."]


def eager_reference(loaded, text: str) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """Token ids, (L, H, T, T) float64 attention from HF eager with output_attentions, and
    each layer's (KVH, T, Dh) value states recomputed from the reference block inputs."""
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation("eager")
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True,
                    output_hidden_states=True)
    attn = torch.stack([a[0] for a in out.attentions]).double()
    values = []
    for layer, block in enumerate(model.model.layers):
        x = out.hidden_states[layer][0]  # the block's input
        attn_mod = block.self_attn
        v = attn_mod.v_proj(block.input_layernorm(x)).view(len(ids), -1, attn_mod.head_dim)
        values.append(v.transpose(0, 1).double())
    return ids, attn, values


def reference_heads(loaded, attn: torch.Tensor, values: list[torch.Tensor], k: int = 0) -> pd.DataFrame:
    n_layers, heads, t, _ = attn.shape
    rows = []
    for layer in range(n_layers):
        o = loaded.model.model.layers[layer].self_attn.o_proj.weight.double()
        dh = values[layer].shape[-1]
        groups = heads // values[layer].shape[0]
        for h in range(heads):
            a = attn[layer, h]
            p = a[:, :t]
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean()
            drain = (values[layer][h // groups] @ o[:, h * dh:(h + 1) * dh].T).norm(dim=-1)
            rows.append({"layer": layer, "head": h, "sink_mass": a[k:, k].sum().item() / (t - k),
                         "attn_entropy": ent.item(), "value_drain_sink": drain[k].item(),
                         "value_drain_rest": torch.cat([drain[:k], drain[k + 1:]]).mean().item()})
    return pd.DataFrame(rows)


def reference_received(attn: torch.Tensor) -> np.ndarray:
    """(L, T): mean over heads and queries i >= j of A[l, h, i, j]."""
    t = attn.shape[-1]
    return (attn.sum(dim=(1, 2)) / (attn.shape[1] * (t - torch.arange(t)))).numpy()


def check_against_eager(loaded, prompts, batch_size, k=0):
    run = tokenprobe.run(loaded, prompts, [SinksProbe(SinksConfig(k_pos=k, block=7))],
                         batch_size=batch_size, progress=False)
    for prompt_id, text in enumerate(prompts):
        ids, attn, values = eager_reference(loaded, text)
        ref = reference_heads(loaded, attn, values, k)
        got = run.heads[run.heads.prompt_id == prompt_id].reset_index(drop=True)
        for col in ["sink_mass", "attn_entropy", "value_drain_sink", "value_drain_rest"]:
            np.testing.assert_allclose(got[col], ref[col], rtol=1e-4, atol=1e-5, err_msg=col)
        tl = run.token_layers[run.token_layers.prompt_id == prompt_id]
        received = tl.pivot(index="layer", columns="pos", values="attn_received").to_numpy()
        np.testing.assert_allclose(received, reference_received(attn), rtol=1e-4, atol=1e-6)
    return run


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_tiny_models_with_padding(fixture, request):
    # tiny-gemma3 has a sliding window of 8 on three of its four layers: prompts are longer
    check_against_eager(request.getfixturevalue(fixture), PROMPTS, batch_size=3)


def test_sink_at_another_position(tiny_llama):
    check_against_eager(tiny_llama, PROMPTS[::2], batch_size=2, k=2)


def test_value_drains_follow_an_output_projection_changed_in_place(tiny_llama):
    # the probe keeps each layer's W_O Gram matrices between batches and runs; an edit of the
    # weights in place (an ablation) must reach the drains of the next run
    model, probe = copy.deepcopy(tiny_llama.model), SinksProbe()
    prompts = ["The cat sat on the mat.", "A dog ran."]

    def drains():
        run = tokenprobe.run(model, prompts, [probe], tokenizer=tiny_llama.tokenizer,
                             progress=False)
        return run.heads.set_index(["prompt_id", "layer", "head"])[
            ["value_drain_sink", "value_drain_rest"]]

    before = drains()
    with torch.no_grad():
        model.model.layers[-1].self_attn.o_proj.weight.mul_(2)  # the values stay as they were
    after = drains()
    last = before.index.get_level_values("layer") == len(model.model.layers) - 1
    np.testing.assert_allclose(after[last], 2 * before[last], rtol=1e-5)
    np.testing.assert_array_equal(after[~last], before[~last])


def test_sink_rate_summary_counts_heads_over_eps(tiny_gemma3):
    run = tokenprobe.run(tiny_gemma3, PROMPTS, ["sinks"], progress=False)
    summary = run.meta["summary"]["sinks"]
    expect = 100 * np.mean([reference_heads(tiny_gemma3, *eager_reference(tiny_gemma3, p)[1:])
                            .sink_mass.gt(0.3).mean() for p in PROMPTS])  # equal head counts
    assert summary["sink_rate"] == pytest.approx(expect)
    lengths = [len(tiny_gemma3.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert (summary["T_min"], summary["T_max"]) == (min(lengths), max(lengths))


@pytest.mark.embedded
def test_smollm2_against_eager(smollm2):
    run = check_against_eager(smollm2, PROMPTS, batch_size=3)
    assert run.heads.sink_mass.mean() > 0.5  # the first token soaks up most attention


@pytest.mark.embedded
def test_gemma3_past_its_sliding_window(gemma3):
    long = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(150))
    assert len(gemma3.tokenizer(long)["input_ids"]) > gemma3.model.config.sliding_window
    check_against_eager(gemma3, [long, PROMPTS[0]], batch_size=2)


def test_secondary_sinks_hand_case():
    # 30 layers (as SmolLM2), candidates 0 and 1; candidate 1 has the larger norm: primary.
    n_layers, t = 30, 6
    norms = np.ones((n_layers, 2))
    norms[:, 1] = [1, 1, 1, *range(50, 76), 5]
    start, end = sink_levels_of(norms[:, 1])
    assert (start, end) == (3, 29)  # jump into layer 3, drop into layer 29: layers 3..28
    cos = np.zeros((n_layers, 2, t))
    cos[:, 1, 1] = 1.0
    cos[5:12, 1, 3] = -0.95       # 7 layers, 4 < 7 < 15, |cos| counts: secondary
    cos[8:10, 1, 4] = 0.93        # 2 layers: noise
    cos[0:3, 1, 5] = 0.99         # outside the searched range: not flagged
    cos[3:19, 1, 2] = 0.91        # 16 layers >= 30 - 15: labelled primary
    cos[:, 1, 0] = 0.99           # before the primary: never a candidate
    frame = secondary_sinks(norms, cos, [0, 1])
    assert frame.to_dict("list") == {
        "pos": [1, 2, 3, 4], "kind": ["primary", "primary", "secondary", "noise"],
        "creation_layer": [3, 3, 5, 8], "lifetime": [26, 16, 7, 2],
        "max_cos": [1.0, pytest.approx(0.91), pytest.approx(0.95), pytest.approx(0.93)]}


def test_single_layer_model_has_only_its_primary():
    norms, cos = np.array([[3.0, 5.0]]), np.full((1, 2, 4), 0.99)
    assert sink_levels_of(norms[:, 1]) == (0, 1)
    frame = secondary_sinks(norms, cos, [0, 1], primary_margin=0)
    assert frame.pos.tolist() == [1, 2, 3] and frame.kind.tolist()[0] == "primary"


def test_sinks_table_follows_the_reference_residuals(tiny_llama):
    config = SinksConfig(primary_margin=1, secondary_min=0, cos_threshold=0.3)
    run = tokenprobe.run(tiny_llama, PROMPTS, [SinksProbe(config)], progress=False)
    for prompt_id, text in enumerate(PROMPTS):
        _, h = block_outputs(tiny_llama, text)  # (L, T, D) without hooks
        cands = [0, 1]
        norms = h[:, cands].norm(dim=-1).numpy()
        cos = torch.nn.functional.cosine_similarity(h[:, None], h[:, cands][:, :, None], dim=-1)
        expect = secondary_sinks(norms, cos.numpy(), cands, cos_threshold=0.3, primary_margin=1,
                                 secondary_min=0)
        got = run.sinks[run.sinks.prompt_id == prompt_id].reset_index(drop=True)
        assert got.pos.tolist() == expect.pos.tolist()
        assert got.kind.tolist() == expect.kind.tolist()
        np.testing.assert_allclose(got.max_cos, expect.max_cos, rtol=1e-5)


def explicit_zero_tuning_eager(gamma: float, heads: set[tuple[int, int]]):
    """An eager attention function applying ZeroTuning's post-softmax formula literally."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1).double()
        v = value.repeat_interleave(groups, 1).double()
        s = query.double() @ k.transpose(-1, -2) * scaling
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask.bool() if attention_mask.dtype == torch.bool
                              else attention_mask < -1, float("-inf"))
        else:
            t = s.shape[-1]
            s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        a = torch.softmax(s, -1)
        for layer, head in heads:
            if layer == module.layer_idx:
                a0 = a[:, head, :, 0].clone()
                denom = 1 + (gamma - 1) * a0
                a[:, head] = a[:, head] / denom[..., None]
                a[:, head, :, 0] = gamma * a0 / denom
        return (a @ v).transpose(1, 2).to(query.dtype), None
    return attention


@pytest.mark.parametrize("fixture", ["tiny_llama", pytest.param("smollm2", marks=pytest.mark.embedded)])
def test_zero_tuning_equals_explicit_renormalisation(fixture, request):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    loaded = request.getfixturevalue(fixture)
    heads = {(0, 1), (1, 0), (1, 2)}
    ids = torch.tensor([loaded.tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with zero_tuning(loaded.model, 0.25, heads):
            tuned = loaded.model(input_ids=ids).logits
        AttentionInterface.register("zt_reference", explicit_zero_tuning_eager(0.25, heads))
        ALL_MASK_ATTENTION_FUNCTIONS.register("zt_reference", sdpa_mask)
        reference = copy.deepcopy(loaded.model)
        reference.set_attn_implementation("zt_reference")
        expect = reference(input_ids=ids).logits
    assert loaded.model.config._attn_implementation == "sdpa"  # switched back
    torch.testing.assert_close(tuned, expect, rtol=1e-4, atol=1e-4)
    assert (tuned - base).abs().max() > 1e-3  # the intervention did something


def test_zero_tuning_in_generation_and_around_probes(tiny_llama):
    ids = torch.tensor([tiny_llama.tokenizer("abc")["input_ids"]])
    with torch.no_grad(), zero_tuning(tiny_llama.model, 3.0):
        greedy = tiny_llama.model.generate(ids, max_new_tokens=6, do_sample=False)
        full = tiny_llama.model(input_ids=greedy).logits  # whole-sequence pass, same tuning
        run = tokenprobe.run(tiny_llama, PROMPTS[:1], ["sinks"], progress=False)
    # incremental decoding under the intervention picks what the full pass would
    assert greedy[0, 3:].tolist() == full[0, 2:-1].argmax(-1).tolist()
    plain = tokenprobe.run(tiny_llama, PROMPTS[:1], ["sinks"], progress=False)
    assert (run.heads.sink_mass > plain.heads.sink_mass).all()  # gamma 3 on every head
    with pytest.raises(ValueError, match="no head"):
        with zero_tuning(tiny_llama.model, 0.5, [(99, 0)]):
            pass
