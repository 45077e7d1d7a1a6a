"""Gradient attribution (tokenprobe.analyses.attribution_gradients): IG's completeness, finite
differences, and Captum's InputXGradient / LayerIntegratedGradients as peers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprobe.analyses.attribution_gradients import (baseline_ids, gradients, ig_parameters,
                                                       input_x_gradient, integrated_gradients,
                                                       saliency, to_units)
from tokenprobe.analyses.attribution_targets import embed, resolve_target, score_embeds
from tokenprobe.analyses.attribution_units import split_units

PROMPT = "The cat sat on the"


@pytest.fixture()
def case(tiny_llama):
    p = tiny_llama.tokenizer(PROMPT)["input_ids"]
    return tiny_llama, p, resolve_target(tiny_llama, p, continuation=" mat")


def test_gradient_matches_finite_difference(case):
    loaded, p, target = case
    g = gradients(loaded, p, target)
    e = embed(loaded, p).detach().double()
    d = torch.zeros_like(e)
    d[2, :] = torch.randn(e.shape[1], generator=torch.Generator().manual_seed(0), dtype=e.dtype)
    d /= d.norm()
    h = 1e-2

    def f(x):
        with torch.no_grad():
            return float(score_embeds(loaded, x.float()[None], torch.ones(1, len(p)), target)[0])

    fd = (f(e + h * d) - f(e - h * d)) / (2 * h)
    assert fd == pytest.approx(float((g * d.numpy()).sum()), rel=2e-2, abs=1e-4)
    np.testing.assert_allclose(saliency(loaded, p, target), np.linalg.norm(g, axis=-1))
    np.testing.assert_allclose(input_x_gradient(loaded, p, target), (e.numpy() * g).sum(-1))


def test_ig_completeness_improves_with_steps(case):
    loaded, p, target = case
    gaps = [abs(integrated_gradients(loaded, p, target, steps=s, batch_size=32)[1])
            for s in (8, 64)]
    assert gaps[1] < gaps[0]
    attr, gap = integrated_gradients(loaded, p, target, baseline="pad", steps=64)
    assert abs(gap) < 0.05 * max(1.0, np.abs(attr).sum())


def test_ig_baseline_equal_to_input_is_zero(case):
    loaded, p, target = case
    attr, gap = integrated_gradients(loaded, p, target, baseline=PROMPT, steps=4)
    assert np.abs(attr).max() == 0 and abs(gap) < 1e-6  # f(x) - f(b) from one batched forward


def test_ig_quadrature_and_baselines(case, tiny_gemma3):
    loaded, p, target = case
    a, w = ig_parameters(50)
    assert w.sum() == pytest.approx(1) and (a ** 3 * w).sum() == pytest.approx(0.25)
    a, w = ig_parameters(5, "riemann_trapezoid")
    np.testing.assert_allclose(a, [0, .25, .5, .75, 1])
    assert w.sum() == pytest.approx(1)
    tok = tiny_gemma3.tokenizer
    ids = tok(PROMPT)["input_ids"]
    b = baseline_ids(tiny_gemma3, ids, "pad")
    assert b[0] == ids[0] == tok.bos_token_id and set(b[1:]) == {tok.pad_token_id}
    with pytest.raises(ValueError, match="tokens"):
        baseline_ids(loaded, p, "short")
    with pytest.raises(ValueError, match="unknown method"):
        ig_parameters(4, "left")


def test_bos_gets_no_ig_attribution(tiny_gemma3):
    ids = tiny_gemma3.tokenizer(PROMPT)["input_ids"]
    target = resolve_target(tiny_gemma3, ids)
    attr, _ = integrated_gradients(tiny_gemma3, ids, target, steps=4)
    assert attr[0] == 0 and np.abs(attr[1:]).sum() > 0


def test_to_units(tiny_llama):
    ids, units = split_units(tiny_llama.tokenizer, "ab cd", "word")
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(to_units(v, units, "integrated_gradients"), [3, 12])
    np.testing.assert_allclose(to_units(v, units, "saliency"), [5 ** .5, 50 ** .5])
    with pytest.raises(ValueError):
        to_units(v, units, "lime")


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2"])
def test_peer_captum(request, name):
    captum_attr = pytest.importorskip("captum.attr")
    loaded = request.getfixturevalue(name)
    model = loaded.model
    p = loaded.tokenizer(PROMPT)["input_ids"]
    target = resolve_target(loaded, p, continuation=" mat")
    full = torch.tensor([p + list(target.ids)])

    def forward(ids):
        logits = model(input_ids=ids, use_cache=False).logits[:, len(p) - 1:-1].double()
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, ids[:, len(p):, None]).sum((1, 2))

    emb_layer = model.get_input_embeddings()
    # InputXGradient on the embeddings (through inputs_embeds), summed over the last dim
    e = embed(loaded, full[0]).detach()[None].requires_grad_(True)

    def forward_embeds(x):
        logits = model(inputs_embeds=x, use_cache=False).logits[:, len(p) - 1:-1].double()
        return torch.log_softmax(logits, -1).gather(-1, full[:, len(p):, None]).sum((1, 2))

    ixg = captum_attr.InputXGradient(forward_embeds).attribute(e)[0, :len(p)].sum(-1)
    np.testing.assert_allclose(input_x_gradient(loaded, p, target), ixg.detach().numpy(),
                               atol=1e-6, rtol=1e-4)
    # LayerIntegratedGradients over the embedding layer with a zero baseline on the prompt:
    # baseline ids -1 there, which a forward hook maps to zero embeddings (the target's
    # tokens keep theirs, as in score_embeds)
    base_ids = full.clone()
    base_ids[:, :len(p)] = -1
    orig = emb_layer.forward
    emb_layer.forward = lambda ids: orig(ids.clamp(min=0)) * (ids >= 0)[..., None]
    try:
        lig = captum_attr.LayerIntegratedGradients(forward, emb_layer)
        ref = lig.attribute(full, baselines=base_ids, n_steps=16, method="gausslegendre",
                            internal_batch_size=16)[0, :len(p)].sum(-1).detach().double().numpy()
    finally:
        del emb_layer.forward
    ours, _ = integrated_gradients(loaded, p, target, steps=16, batch_size=16)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2"])
def test_peer_inseq_step_probability(request, name):
    """inseq's per-step `probability` score = exp of our one-token target on each prefix."""
    inseq = pytest.importorskip("inseq")
    from tokenprobe.analyses.attribution_targets import Target, score_ids

    loaded = request.getfixturevalue(name)
    tok = loaded.tokenizer
    wrapped = inseq.load_model(loaded.model, "saliency", tokenizer=tok)
    out = wrapped.attribute(PROMPT, PROMPT + " mat", step_scores=["probability"],
                            show_progress=False)
    theirs = out.sequence_attributions[0].step_scores["probability"].double().numpy()
    p = tok(PROMPT)["input_ids"]
    c = tok(" mat", add_special_tokens=False)["input_ids"]
    assert len(theirs) == len(c)
    ours = np.exp([score_ids(loaded, [p + c[:k]], Target("continuation", (c[k],)))[0]
                   for k in range(len(c))])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)
