"""tokenprobe's variants beside the papers' sink measures: the centred and massive-dims-removed
cosines and their labels (table `sink_labels`), the sink-like kind outside the searched layers,
and attention received relative to uniform causal attention (`attn_received_norm`)."""
from __future__ import annotations

import copy
import json
import math
from importlib import resources

import numpy as np
import pandas as pd
import pytest
import torch

import tokenprobe
from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.probes.sink_labels import (centered_cosines, longest_runs, nomassive_cosines,
                                           secondary_sinks, token_labels)
from tokenprobe.probes.sinks import SinksConfig, SinksProbe, received_per_key, uniform_received

T, D, SINK = 40, 16, 20  # tokens, width, the one true secondary sink
NORMS = [1e3, 1e6, 1e6, 1e6, 1e6, 5e5]  # the primary's massive value per layer: layers 1..4


def massive_residuals(layer: int = 1) -> np.ndarray:
    """(T, D) float64: every token carries ~2000 in dim 0 (so every raw |cos| to the primary is
    ~0.99), the primary (pos 0) carries NORMS[layer] there and 10 u elsewhere, the true sink
    carries 10,000 there and 300 u elsewhere, and ordinary tokens 300 times random directions."""
    rng = np.random.default_rng(layer)
    u = np.zeros(D)
    u[1:] = rng.normal(size=D - 1)
    u /= np.linalg.norm(u)
    x = np.zeros((T, D))
    x[:, 0] = 2000 + 50 * rng.normal(size=T)
    rest = rng.normal(size=(T, D - 1))
    x[:, 1:] = 300 * rest / np.linalg.norm(rest, axis=1, keepdims=True)
    x[0] = NORMS[layer] * np.eye(D)[0] + 10 * u
    x[SINK] = 10_000 * np.eye(D)[0] + 300 * u
    return x


def reference_cosines(x: np.ndarray, cands: list[int], how: str, top_k: int = 2) -> np.ndarray:
    """(C, T) by the textbook formulas, one pair at a time."""
    out = np.zeros((len(cands), len(x)))
    others = [t for t in range(len(x)) if t not in cands]
    for i, c in enumerate(cands):
        for t in range(len(x)):
            if how == "centered":
                mu = x[others].mean(axis=0)
                a, b = x[t] - mu, x[c] - mu
            else:
                drop = np.argsort(-np.abs(x[c]))[:top_k]
                a, b = np.delete(x[t], drop), np.delete(x[c], drop)
            out[i, t] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


@pytest.mark.parametrize("how", ["centered", "nomassive"])
def test_variant_cosines_equal_the_textbook_formulas(how):
    x = massive_residuals()
    fn = centered_cosines if how == "centered" else nomassive_cosines
    got = fn(torch.from_numpy(x), [0, 1])
    np.testing.assert_allclose(got.numpy(), reference_cosines(x, [0, 1], how), rtol=1e-10)
    got32 = fn(torch.from_numpy(x).float(), [0, 1])  # as the hook computes them
    np.testing.assert_allclose(got32.numpy(), reference_cosines(x, [0, 1], how), atol=1e-5)


def test_nomassive_without_dims_is_the_raw_cosine():
    x = torch.from_numpy(massive_residuals())
    raw = torch.nn.functional.cosine_similarity(x[None], x[[0, 1]][:, None], dim=-1)
    torch.testing.assert_close(nomassive_cosines(x, [0, 1], top_k=0), raw)


def test_one_massive_dim_makes_every_raw_cosine_one_and_the_variants_find_the_sink():
    """The bug: with one massive dim every token has |cos| ~0.99 to the primary and the raw
    criterion labels them all primary; both variants label only the true sink."""
    h = np.stack([massive_residuals(layer) for layer in range(len(NORMS))])  # (L, T, D)
    x = torch.from_numpy(h)
    norms = np.linalg.norm(h[:, [0, 1]], axis=-1)  # (L, C)
    cosines = {
        "raw": torch.nn.functional.cosine_similarity(x[:, None], x[:, [0, 1], None], dim=-1),
        "centered": torch.stack([centered_cosines(layer, [0, 1]) for layer in x]),
        "nomassive": torch.stack([nomassive_cosines(layer, [0, 1]) for layer in x])}
    rules = dict(primary_margin=2, secondary_min=1)  # 6 layers: primary at lifetime >= 4
    labelled = {}
    for name, cos in cosines.items():
        frame = token_labels(norms, cos.numpy(), [0, 1], **rules)
        labelled[name] = frame.pos[frame.kind.isin(["primary", "secondary"])].tolist()
    assert np.abs(cosines["raw"][1:5, 0, 1:].numpy()).min() > 0.95
    assert labelled["raw"] == list(range(T))  # every token: the criterion separates nothing
    assert labelled["centered"] == labelled["nomassive"] == [0, SINK]


def test_the_primary_stays_out_of_the_centre():
    """Centred on the mean of all positions, the primary's 1e6 would move every token onto
    minus the primary's direction (|cos| ~1): the candidates are left out of the mean."""
    x = torch.from_numpy(massive_residuals())
    cos = centered_cosines(x, [0, 1])[0].abs()
    ordinary = [t for t in range(2, T) if t != SINK]
    assert cos[SINK] > 0.99 and cos[ordinary].max() < 0.8
    everything = x - x.mean(0)
    naive = torch.nn.functional.cosine_similarity(everything, everything[:1], dim=-1).abs()
    assert naive[ordinary].min() > 0.95  # what the exclusion prevents


def test_labels_match_wong_et_al_on_the_tokens_they_list():
    rng = np.random.default_rng(3)
    norms = rng.uniform(1, 2, size=(30, 2))
    norms[8:25, 1] += 50  # candidate 1 primary, searched layers 8..24
    cos = rng.uniform(-1, 1, size=(30, 2, 25)) ** 3
    cos[8:20, 1, 5] = 0.95
    theirs = secondary_sinks(norms, cos, [0, 1]).set_index("pos")
    mine = token_labels(norms, cos, [0, 1]).set_index("pos")
    assert mine.index.tolist() == list(range(1, 25))  # every position from the primary on
    listed = mine.loc[theirs.index]
    assert listed.lifetime.tolist() == theirs.lifetime.tolist()
    assert listed.creation_layer.tolist() == theirs.creation_layer.tolist()
    np.testing.assert_allclose(listed.max_cos, theirs.max_cos)
    same = theirs.kind != "noise"  # their noise may be sink_like here
    assert listed.kind[same].tolist() == theirs.kind[same].tolist()
    assert set(listed.kind[~same]) <= {"noise", "sink_like"} and (~same).sum() > 0
    unlisted = mine.drop(theirs.index)
    assert (unlisted.lifetime == 0).all() and unlisted.creation_layer.isna().all()
    assert set(unlisted.kind) <= {"none", "sink_like"}


def test_sink_like_is_a_run_outside_the_searched_layers():
    n_layers, t = 30, 8
    norms = np.ones((n_layers, 2))
    norms[12:28, 0] = 100  # primary 0, searched layers 12..27
    cos = np.zeros((n_layers, 2, t))
    cos[:, 0, 0] = 1
    cos[2:9, 0, 2] = 0.99      # 7 consecutive layers before the search: sink_like, layers 2-8
    cos[2:6, 0, 3] = 0.99      # 4: too short
    cos[[1, 3, 5, 7, 9], 0, 4] = 0.99  # 5 layers, never consecutive
    cos[28:30, 0, 5] = 0.99    # after the search, 2 layers only
    cos[0:6, 0, 6] = 0.95      # 6 before the search, plus 2 inside it: sink_like over noise
    cos[13:15, 0, 6] = 0.95
    cos[10:18, 0, 7] = -0.95   # 8 consecutive, 2 of them before the search: noise
    frame = token_labels(norms, cos, [0, 1])
    assert frame.kind.tolist() == ["primary", "none", "sink_like", "none", "none", "none",
                                   "sink_like", "secondary"]
    like = frame[frame.kind == "sink_like"]
    assert like[["sink_like_first", "sink_like_last"]].astype(int).values.tolist() == [
        [2, 8], [0, 5]]
    assert frame.sink_like_first.drop(like.index).isna().all()
    assert frame.loc[6, "lifetime"] == 2 and frame.loc[7, "lifetime"] == 6
    strict = token_labels(norms, cos, [0, 1], sink_like_min=8)
    assert "sink_like" not in set(strict.kind)


def test_longest_runs():
    flags = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=bool)
    first, length = longest_runs(flags)
    assert first.tolist() == [0, 1, 2] and length.tolist() == [2, 3, 2]
    assert longest_runs(np.zeros((3, 2), dtype=bool))[1].tolist() == [0, 0]


def test_uniform_received_closed_form():
    n = 7
    expect = [np.mean([1 / (i + 1) for i in range(k, n)]) for k in range(n)]
    np.testing.assert_allclose(uniform_received(n), expect)
    assert uniform_received(n)[-1] == pytest.approx(1 / n)
    assert uniform_received(1).tolist() == [1.0]


@pytest.mark.parametrize("impl", ["reference", "torch", "flash", "triton"])
def test_uniform_attention_receives_one_everywhere(impl):
    """q = 0 makes every row uniform over its keys: attn_received_norm = 1 at every real key,
    in prompts shorter than the padded batch too."""
    bsz, heads, kvh, t, dh, lengths = 2, 4, 2, 23, 8, [23, 9]
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(bsz, heads, t, dh)
    k, v = torch.randn(bsz, kvh, t, dh, generator=g), torch.randn(bsz, kvh, t, dh, generator=g)
    _, stats = attention_with_stats(q, k, v, None, torch.tensor(lengths), scaling=dh ** -0.5,
                                    impl=impl, block=5)
    for row, n in enumerate(lengths):
        mean = received_per_key(stats["received"][row, :n].double(), heads).numpy()
        np.testing.assert_allclose(mean / uniform_received(n), np.ones(n), rtol=1e-5)


def test_received_against_an_explicit_causal_softmax():
    bsz, heads, t, dh = 1, 3, 17, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(bsz, heads, t, dh, generator=g, dtype=torch.float64) * 2
               for _ in range(3))
    _, stats = attention_with_stats(q, k, v, None, torch.tensor([t]), scaling=dh ** -0.5,
                                    impl="torch", block=4)
    scores = (q @ k.transpose(-1, -2) * dh ** -0.5)[0]  # (H, T, T)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    a = torch.softmax(scores, -1)
    by_hand = np.array([a[:, j:, j].mean().item() for j in range(t)])
    baseline = np.array([np.mean([1 / (i + 1) for i in range(j, t)]) for j in range(t)])
    mean = received_per_key(stats["received"][0], heads).numpy()
    np.testing.assert_allclose(mean, by_hand, rtol=1e-10)
    np.testing.assert_allclose(mean / uniform_received(t), by_hand / baseline, rtol=1e-10)


def test_the_probe_writes_one_for_a_model_with_zero_queries(tiny_llama):
    """Through the runner: a copy of tiny-llama whose query projections are zero attends
    uniformly in every layer; prompts of different lengths share a padded batch."""
    flat = copy.deepcopy(tiny_llama)
    for block in flat.model.model.layers:
        torch.nn.init.zeros_(block.self_attn.q_proj.weight)
    texts = ["the cat sat on the mat and the dog sat on the rug", "hi there", "a b c d e"]
    run = tokenprobe.run(flat, texts, ["sinks"], batch_size=3, progress=False)
    np.testing.assert_allclose(run.token_layers.attn_received_norm, 1.0, rtol=1e-5)
    plain = tokenprobe.run(tiny_llama, texts, ["sinks"], progress=False).token_layers
    for prompt_id, frame in plain.groupby("prompt_id"):
        for _, layer in frame.groupby("layer"):
            np.testing.assert_allclose(layer.attn_received_norm,
                                       layer.attn_received / uniform_received(len(layer)))


def test_sink_labels_table_and_options(tiny_llama):
    texts = ["the cat sat on the mat and the dog sat on the rug", "hi"]
    config = SinksConfig(cos_threshold=0.3, primary_margin=1, secondary_min=0)
    run = tokenprobe.run(tiny_llama, texts, [SinksProbe(config)], progress=False)
    labels = run.sink_labels
    assert list(labels.columns) == ["prompt_id", "pos", "criterion", "token", "kind",
                                    "creation_layer", "lifetime", "max_cos",
                                    "sink_like_first", "sink_like_last"]
    n_tokens = run.prompts.set_index("prompt_id").n_tokens
    primary = run.sinks.groupby("prompt_id").pos.min()  # the primary: each prompt's first row
    assert labels.groupby("prompt_id").size().tolist() == (3 * (n_tokens - primary)).tolist()
    raw = labels[labels.criterion == "raw"].set_index(["prompt_id", "pos"])
    sinks = run.sinks.set_index(["prompt_id", "pos"])
    assert raw.loc[sinks.index, "lifetime"].tolist() == sinks.lifetime.tolist()
    assert (raw.drop(sinks.index).lifetime == 0).all()
    assert set(labels.kind) <= {"primary", "secondary", "sink_like", "noise", "none"}
    options = {o.name: o for o in SinksProbe.options()}
    assert options["massive_top_k"].default == 2 and options["sink_like_min"].default == 5
    assert "largest |h_l| dims" in options["massive_top_k"].help
    with pytest.raises(ValueError, match="sink_like_min"):
        SinksConfig(sink_like_min=0)


def paragraph() -> str:
    path = resources.files("tokenprobe") / "data" / "long_prose.jsonl"
    return json.loads(path.read_text().splitlines()[0])["text"]


def labelled_share(run, criterion: str) -> float:
    frame = run.sink_labels[(run.sink_labels.criterion == criterion) & (run.sink_labels.pos > 1)]
    return float(frame.kind.isin(["primary", "secondary"]).mean())


def notes(run) -> str:
    return " | ".join(run.meta.get("diagnostics", {}).get("sinks", []))


@pytest.mark.embedded
def test_gemma3_variants_separate_what_the_raw_cosine_does_not(gemma3):
    """Gemma 3 270M: dims 163 and 400 dominate every residual; the raw cosine labels nearly
    every token primary, the centred and massive-dims-removed cosines a few percent."""
    run = tokenprobe.run(gemma3, [paragraph()], ["sinks"], progress=False)
    assert labelled_share(run, "raw") > 0.9
    assert labelled_share(run, "centered") < 0.1 and labelled_share(run, "nomassive") < 0.1
    raw = run.sink_labels[run.sink_labels.criterion == "raw"]
    centred = run.sink_labels[run.sink_labels.criterion == "centered"]
    assert raw.max_cos.median() > 0.9 > centred.max_cos.median()
    said = notes(run)
    assert "tokens labelled primary or secondary on tokenprobe's variants" in said
    assert "it does not separate tokens" not in said  # neither variant fails here
    assert "attn_received peaks in the last 10% of positions" in said


@pytest.mark.embedded
def test_smollm2_the_tokens_are_sink_like_before_the_searched_layers(smollm2):
    """SmolLM2: " the" tokens (the first four of the paragraph's nine) share the first token's
    massive dim 507 at blocks 2-8, before the primary's norm jumps (block 11): the centred
    cosine marks them sink_like there, and nothing else; Wong et al.'s search, and the cosine
    without dim 507, do not."""
    run = tokenprobe.run(smollm2, [paragraph()], ["sinks"], progress=False)
    labels = run.sink_labels
    like = labels[(labels.criterion == "centered") & (labels.kind == "sink_like")]
    tokens = run.tokens.set_index("pos").token
    the = [p for p, text in tokens.items() if text == " the"]
    assert set(like.pos) <= set(the) and len(like) >= 3
    assert (like.sink_like_first <= 2).all() and (like.sink_like_last >= 7).all()
    assert (like.sink_like_last < 11).all()
    assert set(run.sinks.pos) == {0}  # the paper's labels: the primary alone
    nomassive = labels[labels.criterion == "nomassive"]
    assert "sink_like" not in set(nomassive.kind)
    assert "behave like sinks outside the layers Wong et al.'s search covers" in notes(run)


@pytest.mark.embedded
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_the_sink_and_the_last_key_both_exceed_uniform(fixture, request):
    """What attn_received_norm shows on a real paragraph: the first token receives several
    times its uniform share in most layers, and so does the last position (a single query's
    attention to itself), which is why the normalisation does not remove the late peak."""
    run = tokenprobe.run(request.getfixturevalue(fixture), [paragraph()], ["sinks"],
                         progress=False)
    tl = run.token_layers
    last = tl.pos.max()
    by_layer = tl.pivot(index="layer", columns="pos", values="attn_received_norm")
    assert (by_layer[0] > 3).mean() > 0.5
    assert (by_layer[last] > 3).mean() > 0.5
    mean = tl.groupby("pos").attn_received.mean()
    assert mean.drop([0, 1]).idxmax() >= 0.9 * last  # the late peak the diagnostic names
    assert "attn_received_norm (ratio to uniform causal attention) peaks there too" in notes(run)
    assert isinstance(run.sink_labels, pd.DataFrame)


def test_a_padded_batch_labels_as_each_prompt_alone(tiny_llama):
    """The hooks reduce a right-padded batch at once: padding stays out of every cosine and of
    the centre, and a prompt too short for every candidate is reduced on its own."""
    texts = ["the cat sat on the mat and the dog sat on the rug", "a b c d e", "x"]
    config = SinksConfig(cos_threshold=0.3, primary_margin=1, secondary_min=0)
    together = tokenprobe.run(tiny_llama, texts, [SinksProbe(config)], batch_size=3,
                              progress=False)
    alone = tokenprobe.run(tiny_llama, texts, [SinksProbe(config)], batch_size=1,
                           progress=False)
    assert together.prompts.n_tokens.min() <= max(config.candidates)  # the short-row path
    for table in ("sink_labels", "sinks", "token_layers", "heads"):
        got, want = getattr(together, table), getattr(alone, table)
        assert len(got) == len(want) > 0, table
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-4, atol=1e-6)
