"""Entropy probe: every column against an explicit float64 softmax over the model's own logits."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import tokenprobe
from tokenprobe.models import LoadedModel
from tokenprobe.probes import EntropyConfig, EntropyProbe
from tokenprobe.probes.entropy import entropy_bands, tip_quadrant, window_entropy
from tokenprobe.probes.entropy_measures import top_k_forking, topk_entropy
from tokenprobe.tokens import token_text

from conftest import PROMPTS


def full_log_probs(loaded: LoadedModel, text: str) -> tuple[list[int], torch.Tensor]:
    """The model's own full logits (every position, HF forward), explicit fp64 log-softmax."""
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids]), logits_to_keep=0).logits[0]
    return ids, torch.log_softmax(logits.double(), dim=-1)  # (T, V)


def reference_tokens(loaded: LoadedModel, text: str) -> pd.DataFrame:
    """Per-token reference columns for one prompt, straight from the definitions."""
    ids, logp = full_log_probs(loaded, text)
    v = logp.shape[-1]
    rows = []
    for pos in range(1, len(ids)):
        lp = logp[pos - 1]
        p = lp.exp()
        top = torch.topk(lp, 2)
        rows.append({
            "pos": pos,
            "entropy": float(-(p * lp).sum()),
            "logprob": float(lp[ids[pos]]),
            "rank": int(1 + (lp > lp[ids[pos]]).sum()),
            "top1_id": int(top.indices[0]),
            "top1_prob": float(top.values[0].exp()),
            "margin": float(top.values[0].exp() - top.values[1].exp()),
            "self_certainty": float(-(lp + math.log(v)).mean()),  # -(1/V) sum log(V p)
        })
    return pd.DataFrame(rows)


COLUMNS = ["entropy", "logprob", "top1_prob", "margin", "self_certainty"]


def check_tokens(loaded: LoadedModel, prompts: list[str], batch_size: int = 8) -> pd.DataFrame:
    run = tokenprobe.run(loaded, prompts, ["entropy"], batch_size=batch_size, progress=False)
    tokens = run.tokens
    for i, text in enumerate(prompts):
        ours = tokens[tokens.prompt_id == i].reset_index(drop=True)
        assert ours.loc[0, ["entropy", "logprob", "rank"]].isna().all()  # pos 0 predicts nothing
        ref = reference_tokens(loaded, text)
        got = ours.iloc[1:].reset_index(drop=True)
        for col in COLUMNS:
            np.testing.assert_allclose(got[col].to_numpy(float), ref[col], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{loaded.name} prompt {i} {col}")
        # rank and top-1 id exactly, where the reference has no near-tie at the target
        assert (got["top1_id"].to_numpy(int) == ref["top1_id"]).all()
        assert (got["rank"].to_numpy(int) == ref["rank"]).all()
    return tokens


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_tiny_models_with_padding(fixture, request):
    loaded = request.getfixturevalue(fixture)
    check_tokens(loaded, PROMPTS, batch_size=3)  # one padded batch


@pytest.mark.embedded
def test_smollm2_against_explicit_softmax(smollm2):
    tokens = check_tokens(smollm2, PROMPTS[:1] + PROMPTS[2:], batch_size=2)
    assert tokens.entropy.dropna().between(0, math.log(49152)).all()


@pytest.mark.embedded
def test_gemma3_against_explicit_softmax(gemma3):
    check_tokens(gemma3, PROMPTS[2:])


def test_window_entropy_hand_case():
    h = np.array([np.nan, 1.0, 2.0, 3.0, 4.0, 5.0])
    nxt = window_entropy(h, 2, start="next")
    np.testing.assert_allclose(nxt, [1.5, 2.5, 3.5, 4.5, np.nan, np.nan])  # only whole windows
    np.testing.assert_allclose(window_entropy(h, 2, start="next", partial=True),
                               [1.5, 2.5, 3.5, 4.5, 5.0, np.nan])
    cur = window_entropy(h, 2, start="current")
    np.testing.assert_allclose(cur, [1.0, 1.5, 2.5, 3.5, 4.5, np.nan])


def test_window_entropy_is_the_ares_codes():
    """ARES counts a window at t only when len - t - 1 >= w, as the mean of H[t+1 : t+1+w]."""
    rng = np.random.default_rng(1)
    for n, w in ((12, 4), (5, 4), (4, 4), (9, 1)):
        h = rng.random(n)
        theirs = [h[t + 1:t + 1 + w].mean() if n - t - 1 >= w else np.nan for t in range(n)]
        np.testing.assert_allclose(window_entropy(h, w), theirs)


def test_topk_entropy_hand_case():
    p = np.array([[0.5, 0.25, 0.0], [0.9, 0.1, 0.0]])
    np.testing.assert_allclose(topk_entropy(p), [0.5 * math.log(2) + 0.25 * math.log(4),
                                                 -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])
    np.testing.assert_allclose(topk_entropy(p, tail=True)[0],
                               0.5 * math.log(2) + 0.25 * math.log(4) + 0.25 * math.log(4))


def test_bands_and_forking_hand_case():
    h = pd.Series([np.nan, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    band, forking, q = entropy_bands(h)
    assert q == {"q_low": 4.5, "q_high": 7.2,  # numpy linear quantiles
                 "forking_k": 2, "forking_threshold": 8.0}  # ceil(0.2 x 10) tokens
    assert band.isna()[0] and forking.isna()[0]
    assert band[1:].tolist() == ["low"] * 5 + ["mid"] * 3 + ["high"] * 2
    assert forking[1:].tolist() == [False] * 8 + [True] * 2


def authors_top_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float
                     ) -> torch.Tensor:
    """The 80/20 code's get_global_entropy_top_mask (core_algos.py), its logic on (B, S)."""
    flat, mask = entropy.flatten(), response_mask.flatten().bool()
    response = flat[mask]
    top_k = max(1, int(len(response) * top_ratio + 0.9999))
    _, idx = torch.topk(response, k=top_k)
    out = torch.zeros_like(flat, dtype=torch.long)
    out[mask.nonzero().squeeze(1)[idx]] = 1
    return out.view_as(entropy)


def test_forking_is_the_authors_exact_top_k_over_the_response():
    rng = np.random.default_rng(0)
    for n in (1, 4, 15, 16, 37):  # 0.2 x 15 = 3.0000000000000004: their ceil gives 3
        h = rng.random(n)
        mask = rng.random(n) < 0.7
        mask[0] = True
        theirs = authors_top_mask(torch.tensor(h[None]), torch.tensor(mask[None]), 0.2)[0]
        ours = top_k_forking(pd.Series(h), pd.Series(mask), 0.2)
        assert ours[~mask].isna().all()
        assert ours[mask].astype(bool).tolist() == theirs[torch.tensor(mask)].bool().tolist()
    # quantised entropies: ties at the threshold never add tokens (>= quantile took 7, not 4)
    h = pd.Series([0.5] * 6 + [0.1] * 10 + [0.9] * 2)
    forking = top_k_forking(h, pd.Series(True, index=h.index), 0.2)
    assert forking.sum() == 4 == int(authors_top_mask(torch.tensor(h.to_numpy()[None]),
                                                      torch.ones(1, 18), 0.2).sum())
    assert forking.tolist() == [True, True] + [False] * 14 + [True, True]  # earliest ties
    assert (h >= np.quantile(h, 0.8)).sum() == 8  # the old rule's count


def test_tip_quadrants_hand_case():
    v = 16  # ln V = 2.77; thresholds 0.5 of each normalised axis
    ent = np.array([2.0, 2.0, 0.1, 0.1, np.nan])
    jsd = np.array([0.5, 0.1, 0.5, 0.1, 0.2])
    assert tip_quadrant(ent, jsd, v).tolist() == ["high_H_high_D", "high_H_low_D",
                                                  "low_H_high_D", "low_H_low_D", None]


def test_run_level_bands_summaries_and_prompt_quantiles(tiny_llama):
    run = tokenprobe.run(tiny_llama, PROMPTS, ["entropy"], progress=False)
    tokens, prompts = run.tokens, run.prompts
    scored = tokens.dropna(subset=["entropy"])
    q80 = np.quantile(scored.entropy, 0.8)
    k = max(1, int(len(scored) * 0.2 + 0.9999))
    assert (scored.forking == scored.entropy.rank(method="first", ascending=False).le(k)).all()
    assert (scored.band == "high").sum() == (scored.entropy >= q80).sum()
    for i, g in scored.groupby("prompt_id"):
        row = prompts.set_index("prompt_id").loc[i]
        assert row.perplexity == pytest.approx(math.exp(-g.logprob.mean()))
        assert row.mean_self_certainty == pytest.approx(g.self_certainty.mean())
        assert row.forking_share == pytest.approx(g.forking.astype(bool).mean())
    s = run.meta["summary"]["entropy"]
    assert s["n_scored"] == len(scored) and s["q_high"] == pytest.approx(q80)
    assert s["forking_k"] == k == scored.forking.sum()
    assert s["perplexity"] == pytest.approx(math.exp(-scored.logprob.mean()))
    # per-prompt quantiles: every prompt has its own top share flagged
    per = tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(EntropyConfig(
        quantiles_over="prompt"))], progress=False).tokens.dropna(subset=["entropy"])
    for _, g in per.groupby("prompt_id"):
        k = max(1, int(len(g) * 0.2 + 0.9999))
        assert (g.forking == g.entropy.rank(method="first", ascending=False).le(k)).all()


def lens_reference(loaded: LoadedModel, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(L, T-1) lens entropy and KL to final from the block outputs, explicit fp64 softmax."""
    model = copy.deepcopy(loaded.model)
    norm, head = model.model.norm, model.lm_head
    model.model.norm = torch.nn.Identity()
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1:]
        logp = torch.stack([torch.log_softmax(head(norm(h[0])).double(), -1) for h in hs])
    logp = logp[:, :-1]  # (L, T-1, V): position t predicts token t + 1
    ent = -(logp.exp() * logp).sum(-1)
    kl = (logp.exp() * (logp - logp[-1:])).sum(-1)
    return ent.numpy(), kl.numpy()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_logit_lens_against_block_outputs(fixture, request):
    loaded = request.getfixturevalue(fixture)
    probe = EntropyProbe(EntropyConfig(lens=True))
    run = tokenprobe.run(loaded, PROMPTS, [probe], batch_size=3, progress=False)
    tl = run.token_layers
    for i, text in enumerate(PROMPTS):
        ent, kl = lens_reference(loaded, text)
        ours = tl[tl.prompt_id == i].sort_values(["layer", "pos"])
        assert ours[ours.pos == 0].lens_entropy.isna().all()
        ours = ours[ours.pos > 0]
        got_e = ours.lens_entropy.to_numpy(float).reshape(ent.shape)
        got_k = ours.lens_kl_to_final.to_numpy(float).reshape(kl.shape)
        np.testing.assert_allclose(got_e, ent, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_k, kl, rtol=1e-4, atol=1e-4)
    # the last layer's lens is the model's own distribution
    last = tl[tl.layer == loaded.model.config.num_hidden_layers - 1].dropna(subset=["lens_entropy"])
    merged = last.merge(run.tokens, on=["prompt_id", "pos"])
    np.testing.assert_allclose(merged.lens_entropy, merged.entropy, rtol=1e-5, atol=1e-5)


def perturbed(loaded: LoadedModel, scale: float = 0.3, seed: int = 1) -> LoadedModel:
    """A second model over the same vocabulary: the tiny model with noise on every weight."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(0.02))
    return LoadedModel(f"{loaded.name}-perturbed", model, loaded.tokenizer, "test:perturbed")


def test_two_model_mode_against_explicit_softmax(tiny_llama):
    teacher = perturbed(tiny_llama)
    beta = 1.0
    probe = EntropyProbe(EntropyConfig(contrast_beta=beta), compare=teacher)
    run = tokenprobe.run(tiny_llama, PROMPTS, [probe], batch_size=3, progress=False)
    tokens = run.tokens
    v = tiny_llama.model.config.vocab_size
    for i, text in enumerate(PROMPTS):
        ids, lp = full_log_probs(tiny_llama, text)
        _, lq = full_log_probs(teacher, text)
        lp, lq = lp[:-1], lq[:-1]
        p, q = lp.exp(), lq.exp()
        m = 0.5 * (p + q)
        jsd = 0.5 * (p * (lp - m.log())).sum(-1) + 0.5 * (q * (lq - m.log())).sum(-1)
        with torch.no_grad():  # cDPO on the raw logits of both models
            zp = tiny_llama.model(input_ids=torch.tensor([ids]), logits_to_keep=0).logits[0, :-1]
            zq = teacher.model(input_ids=torch.tensor([ids]), logits_to_keep=0).logits[0, :-1]
        ce = torch.softmax((1 + beta) * zp.double() - beta * zq.double(), -1)
        target = torch.tensor(ids[1:])
        ref = {"teacher_entropy": -(q * lq).sum(-1), "kl_student_teacher": (p * (lp - lq)).sum(-1),
               "kl_teacher_student": (q * (lq - lp)).sum(-1), "jsd": jsd,
               "teacher_logprob": lq.gather(1, target[:, None])[:, 0],
               "critical_ce": ce.gather(1, target[:, None])[:, 0]}
        ours = tokens[(tokens.prompt_id == i) & (tokens.pos > 0)]
        for col, want in ref.items():
            np.testing.assert_allclose(ours[col].to_numpy(float), want.numpy(), rtol=1e-4,
                                       atol=1e-5, err_msg=col)
        norm_h, norm_d = ours.entropy.to_numpy(float) / math.log(v), jsd.numpy() / math.log(2)
        np.testing.assert_allclose(ours.tip_weight, norm_h * norm_d, rtol=1e-4)
    # TIP's quadrants at the run's medians of entropy and JSD (tokenprobe's default)
    scored = tokens[tokens.pos > 0]
    h_at, d_at = np.quantile(scored.entropy, 0.5), np.quantile(scored.jsd, 0.5)
    want = np.where(scored.entropy >= h_at, np.where(scored.jsd >= d_at, "high_H_high_D",
                                                     "high_H_low_D"),
                    np.where(scored.jsd >= d_at, "low_H_high_D", "low_H_low_D"))
    assert scored.tip_quadrant.tolist() == want.tolist()
    assert scored.tip_quadrant.value_counts().min() > 0  # medians split both axes
    fixed = tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(EntropyConfig(
        tip_thresholds="fixed"), compare=teacher)], progress=False).tokens
    fixed = fixed[fixed.pos > 0]
    assert fixed.tip_quadrant.tolist() == tip_quadrant(
        fixed.entropy.to_numpy(float), fixed.jsd.to_numpy(float), v).tolist()
    assert run.meta["probes"][0]["compare"]["model"] == "tiny-llama-perturbed"
    assert (tokens.jsd.dropna() > 0).all() and (tokens.jsd.dropna() <= math.log(2)).all()


def test_compare_model_must_share_the_vocabulary(tiny_llama):
    other = copy.deepcopy(tiny_llama.model)
    other.resize_token_embeddings(300)  # 300 unembedding rows against 259
    bigger = LoadedModel("tiny-llama-300", other, tiny_llama.tokenizer, "test:300")
    with pytest.raises(ValueError, match="does not share the vocabulary"):
        tokenprobe.run(tiny_llama, PROMPTS[:1], [EntropyProbe(compare=bigger)], progress=False)
    with pytest.raises(ValueError, match="needs a compare model"):
        EntropyProbe(EntropyConfig(contrast_beta=1.0))


def test_entropy_runs_through_bridge_and_nnsight(tiny_llama):
    from tokenprobe.backends import as_bridge, as_nnsight

    want = tokenprobe.run(tiny_llama, PROMPTS, ["entropy"], progress=False).tokens
    for model in (as_bridge(copy.deepcopy(tiny_llama)), as_nnsight(tiny_llama)):
        got = tokenprobe.run(model, PROMPTS, ["entropy"], tokenizer=tiny_llama.tokenizer,
                             progress=False).tokens
        np.testing.assert_allclose(got.entropy.to_numpy(float), want.entropy.to_numpy(float),
                                   rtol=1e-4, atol=1e-5)
        assert got["rank"].equals(want["rank"])


def test_final_logit_softcapping_is_applied(tiny_gemma3):
    """Gemma 2 style final_logit_softcapping: the probe reads it from the config, and the model's
    own (capped) logits are the reference."""
    model = copy.deepcopy(tiny_gemma3.model)
    model.config.final_logit_softcapping = 0.5  # tight enough to change every distribution
    capped = LoadedModel("tiny-gemma3-capped", model, tiny_gemma3.tokenizer, "test:capped")
    tokens = check_tokens(capped, PROMPTS[:1])
    plain = tokenprobe.run(tiny_gemma3, PROMPTS[:1], ["entropy"], progress=False).tokens
    assert (tokens.entropy - plain.entropy).abs().max() > 1e-3  # the cap changed something


def test_ares_window_over_top_10_entropies(tiny_llama):
    cfg = EntropyConfig(window_topk=10, window_tail=True)
    tokens = tokenprobe.run(tiny_llama, PROMPTS[:1], [EntropyProbe(cfg)], progress=False).tokens
    _, logp = full_log_probs(tiny_llama, PROMPTS[0])
    top = logp[:-1].exp().topk(10, dim=-1).values.numpy()  # explicit softmax, its top 10
    rest = 1 - top.sum(1)
    want = -(top * np.log(top)).sum(1) - rest * np.log(rest)
    np.testing.assert_allclose(tokens.topk_entropy[1:], want, rtol=1e-4)
    np.testing.assert_allclose(tokens.window_entropy, window_entropy(want_at := np.r_[np.nan, want],
                                                                     4), rtol=1e-4)
    assert np.isnan(tokens.window_entropy.iloc[-4:]).all() and want_at.size == len(tokens)


def test_temperature_scales_the_logits(tiny_llama):
    t = 0.6
    tokens = tokenprobe.run(tiny_llama, PROMPTS[:1], [EntropyProbe(EntropyConfig(
        temperature=t))], progress=False).tokens
    ids = tiny_llama.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([ids]), logits_to_keep=0).logits[0, :-1]
    logp = torch.log_softmax(logits.double() / t, dim=-1)
    want_h = -(logp.exp() * logp).sum(-1)
    want_lp = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(tokens.entropy[1:], want_h.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tokens.logprob[1:], want_lp.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        EntropyConfig(temperature=0)


def test_alternatives_name_the_top_3_of_the_explicit_softmax(tiny_llama):
    tokens = tokenprobe.run(tiny_llama, PROMPTS[:1], ["entropy"], progress=False).tokens
    _, logp = full_log_probs(tiny_llama, PROMPTS[0])
    top = logp[:-1].exp().topk(3, dim=-1)
    tok = tiny_llama.tokenizer
    assert pd.isna(tokens.alternatives[0])
    for pos in (1, 5, len(tokens) - 1):
        ids, probs = top.indices[pos - 1].tolist(), top.values[pos - 1].tolist()
        texts = [f"'{token_text(tok, i)}' {p:.3g}" for i, p in zip(ids, probs)]
        assert tokens.alternatives[pos] == " | ".join(texts)
