"""Attribution targets (tokenprobe.analyses.attribution_targets) against unpadded forwards and a
log-softmax by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprobe.analyses.attribution_targets import (Target, embed, resolve_target, score_embeds,
                                                     score_ids)

PROMPT = "The cat sat on the"


def by_hand(loaded, seq, opt):
    """Total log-prob of `opt` after `seq`: one unpadded forward, log_softmax in float64."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([list(seq) + list(opt)])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(seq) - 1 + k, t]) for k, t in enumerate(opt))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3", "smollm2"])
def test_score_ids_and_embeds_match_unpadded(request, name):
    loaded = request.getfixturevalue(name)
    tok = loaded.tokenizer
    p = tok(PROMPT)["input_ids"]
    seqs = [p, p[:2], p[:1], p[:1] + p[3:]]  # different lengths, one of a single token
    cont = resolve_target(loaded, p, continuation=" mat.")
    contrast = resolve_target(loaded, p, options=(" mat", " dog"))
    for target in (cont, contrast):
        want = np.array([sum(sign * by_hand(loaded, s, o) for o, sign in target.options())
                         for s in seqs])
        done = []
        got = score_ids(loaded, seqs, target, batch_size=3, progress=done.append)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # float32 batching noise
        one_row = all(len(o) == 1 for o, _ in target.options())  # options share a row
        assert sum(done) == len(seqs) * (1 if one_row else len(target.options()))
        with torch.no_grad():
            emb = score_embeds(loaded, embed(loaded, p)[None], torch.ones(1, len(p)), target)
        np.testing.assert_allclose(emb.numpy(), want[:1], atol=1e-5, rtol=0)


def test_gemma3_embeddings_are_scaled_once(tiny_gemma3):
    """embed() is what inputs_embeds must be: the raw table times sqrt(d), scaled once."""
    model = tiny_gemma3.model
    ids = tiny_gemma3.tokenizer(PROMPT)["input_ids"]
    raw = model.get_input_embeddings().weight[ids]
    scale = model.config.hidden_size ** 0.5
    torch.testing.assert_close(embed(tiny_gemma3, ids), raw * torch.tensor(scale, dtype=raw.dtype))
    with torch.no_grad():
        a = model(input_ids=torch.tensor([ids])).logits
        b = model(inputs_embeds=embed(tiny_gemma3, ids)[None]).logits
    torch.testing.assert_close(a, b)


def test_score_embeds_left_padded_rows_and_gradient(tiny_llama):
    p = tiny_llama.tokenizer(PROMPT)["input_ids"]
    target = resolve_target(tiny_llama, p, continuation=" mat")
    short = p[:3]
    e = torch.stack([embed(tiny_llama, p), torch.cat([embed(tiny_llama, p[3:]) * 0,
                                                       embed(tiny_llama, short)])])
    mask = torch.tensor([[1] * len(p), [0] * (len(p) - 3) + [1] * 3])  # left padding
    e = e.detach().requires_grad_(True)
    f = score_embeds(tiny_llama, e, mask, target)
    np.testing.assert_allclose(f.detach().numpy(), score_ids(tiny_llama, [p, short], target),
                               atol=1e-5)
    (g,) = torch.autograd.grad(f.sum(), e)
    assert g[0].abs().sum() > 0 and g[1, :len(p) - 3].abs().max() < 1e-6  # padding gets no gradient


def test_resolve_target(tiny_llama):
    tok = tiny_llama.tokenizer
    p = tok(PROMPT)["input_ids"]
    greedy = resolve_target(tiny_llama, p)
    with torch.no_grad():
        y = int(tiny_llama.model(input_ids=torch.tensor([p])).logits[0, -1].argmax())
    assert (greedy.kind, greedy.ids) == ("greedy", (y,))
    cont = resolve_target(tiny_llama, p, continuation=" mat")
    assert cont.ids == tuple(tok(" mat", add_special_tokens=False)["input_ids"])
    assert resolve_target(tiny_llama, p, continuation=[5, 6]).ids == (5, 6)
    c = resolve_target(tiny_llama, p, options=(" a", " b"))
    assert c.kind == "contrast" and c.alt_ids and "contrast" in c.describe()
    np.testing.assert_allclose(score_ids(tiny_llama, [p], c),
                               by_hand(tiny_llama, p, c.ids) - by_hand(tiny_llama, p, c.alt_ids),
                               atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        resolve_target(tiny_llama, p, continuation="x", options=("a", "b"))
    with pytest.raises(ValueError):
        Target("contrast", (1,))
    with pytest.raises(ValueError, match="at least one token"):
        score_ids(tiny_llama, [[]], cont)
