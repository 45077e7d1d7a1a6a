"""The Bigram-Backcopy toy: sampler rule, tokenizer round trip, saved models, sink emergence, and
the faithful setting against mirrors of Guo et al.'s code (data, model, optimiser)."""
from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

import tokenprobe
from tokenprobe.analyses import toy

TINY = toy.ToyConfig(d_model=32, seq_len=32, batch_size=2, steps=3, eval_sequences=4)


@pytest.fixture(scope="module")
def task() -> toy.BigramTask:
    return toy.BigramTask.from_text(toy.default_text())


def sample(task: toy.BigramTask, n: int = 64, length: int = 256, seed: int = 0) -> torch.Tensor:
    return task.sample(n, length=length, generator=torch.Generator().manual_seed(seed))


def test_task_from_text_keeps_most_frequent_chars():
    task = toy.BigramTask.from_text("aaaa bbb cc d!", max_chars=4, n_triggers=2)
    assert task.chars == ("a", " ", "b", "c")  # by count, ties by code point; 'd', '!' dropped
    assert task.char_counts == (4, 3, 3, 2)
    # bigrams over the filtered text "aaaa bbb cc " (dropped characters removed, not replaced)
    assert task.bigrams[0] == (3, 1, 0, 0)
    assert task.bigrams[1] == (0, 0, 1, 1)
    assert sum(map(sum, task.bigrams)) == len("aaaa bbb cc ") - 1
    assert task.vocab[:2] == [toy.BOS, toy.DELIM] and task.trigger_ids == [2, 3]
    probs = task.transitions()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=torch.float64))
    assert probs[:, :2].sum() == 0  # BOS and the delimiter are never generated
    assert probs[0, 2:4].sum() == 0  # the first token is never a trigger


def test_default_text_vocabulary(task):
    assert 3 < len(task.chars) <= 65
    assert [task.chars[i - 2] for i in task.trigger_ids] == [" ", "e", "t"]


def test_sampler_obeys_the_rule(task):
    seqs = sample(task)
    assert seqs.shape == (64, 256)
    assert (seqs[:, 0] == 0).all()  # BOS first
    assert ((seqs[:, 1:] >= 2) & (seqs[:, 1:] < len(task.vocab))).all()  # characters only
    is_trigger = torch.isin(seqs, torch.tensor(task.trigger_ids))
    assert not is_trigger[:, 1].any()  # every trigger has a character before it
    rows, cols = torch.nonzero(is_trigger[:, 1:-1], as_tuple=True)
    cols = cols + 1
    assert len(rows) > 1000
    assert (seqs[rows, cols + 1] == seqs[rows, cols - 1]).all()  # back-copy after each trigger


def test_sampler_follows_bigrams_elsewhere(task):
    seqs = sample(task, n=256)
    probs = task.transitions()
    prev, nxt = seqs[:, 1:-1].reshape(-1), seqs[:, 2:].reshape(-1)
    for char_id in (5, 6):  # frequent non-trigger characters
        following = nxt[prev == char_id]
        empirical = torch.bincount(following, minlength=len(probs)).double() / len(following)
        assert len(following) > 1000
        assert 0.5 * (empirical - probs[char_id]).abs().sum() < 0.05  # total variation


def test_sampler_is_seeded_without_global_state(task):
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    a, b = sample(task, seed=3), sample(task, seed=3)
    assert torch.rand(1) == before  # the global generator was not used
    assert torch.equal(a, b) and not torch.equal(a, sample(task, seed=4))


def test_tokenizer_round_trip(task):
    tokenizer = toy.char_tokenizer(task)
    assert len(tokenizer) == len(task.vocab) and tokenizer.bos_token_id == 0
    for row in sample(task, n=8):
        text = tokenizer.decode(row[1:].tolist())
        assert len(text) == 255
        assert tokenizer(text)["input_ids"] == row.tolist()
    assert tokenizer("a, b\n")["input_ids"][0] == 0


def test_tiny_training_saves_a_loadable_model(tmp_path, task):
    trained = toy.train_toy(TINY, progress=False, threads=1)
    path = toy.save_toy(trained, tmp_path / "m")
    toy.save_toy(trained, tmp_path / "m")  # replacing leaves no staging directories behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded = tokenprobe.load(str(path))
    assert loaded.model.config.n_layer == 1 and loaded.model.config.n_embd == 32
    ids = sample(task, n=2, length=32)
    for row in ids:
        text = loaded.tokenizer.decode(row[1:].tolist())
        assert loaded.tokenizer(text)["input_ids"] == row.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained.model(ids).logits)
    saved_task, info = toy.load_task(path)
    assert saved_task == trained.task
    assert info["config"]["steps"] == 3 and 0 <= info["eval"]["trigger_accuracy"] <= 1
    assert info["eval"]["loss"] > info["eval"]["oracle_loss"] > 0


def test_toy_report_columns(tmp_path):
    config = toy.ToyConfig(n_layer=2, d_model=32, seq_len=32, batch_size=2, steps=2,
                           eval_sequences=4)
    path = toy.save_toy(toy.train_toy(config, progress=False, threads=1), tmp_path / "m")
    report = toy.toy_report(path, n_prompts=3)
    assert list(report.layer) == [0, 1]
    assert {"sink_mass", "value_drain_sink", "value_drain_rest", "drain_ratio",
            "resid_norm_bos", "resid_norm_other_max", "peak_ratio"} <= set(report.columns)
    assert report.notna().all().all()
    assert report.attrs["uniform_sink_mass"] == pytest.approx(
        sum(1 / i for i in range(1, 33)) / 32)


def test_bos_sink_emerges(tmp_path):
    """A small 1-layer model (d = 64, T = 64, lr 2e-3) grows a BOS sink and a value drain in
    300 steps (about 10 s on one thread).

    Measured, seeds 0 / 1 / 2: sink_mass 0.074 untrained (uniform causal attention at T = 64),
    0.46 / 0.30 / 0.42 trained; drain_ratio (BOS value norm / others') 0.89 / 1.07 / 0.83
    untrained, 0.19 / 0.25 / 0.19 trained. The thresholds sit between them.
    """
    config = toy.ToyConfig(d_model=64, seq_len=64, batch_size=32, lr=2e-3, steps=300,
                           eval_sequences=16)
    untrained = toy.save_toy(toy.train_toy(dataclasses.replace(config, steps=0),
                                           progress=False, threads=1), tmp_path / "untrained")
    trained = toy.save_toy(toy.train_toy(config, progress=False, threads=1), tmp_path / "trained")
    before = toy.toy_report(untrained, n_prompts=8)
    after = toy.toy_report(trained, n_prompts=8)
    threshold = 0.25
    assert before.sink_mass[0] < threshold  # the assertion below can fail
    assert after.sink_mass[0] > threshold
    assert after.sink_mass[0] > 3 * after.attrs["uniform_sink_mass"]
    assert before.drain_ratio[0] > 0.5 > after.drain_ratio[0]


def test_cli_parser_and_handler(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tokenprobe")
    toy.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["toy", "bigram-backcopy"])
    assert (args.out, args.layers, args.steps, args.scale, args.func) == (
        "runs/toy", [1, 3], None, "small", toy.cmd_toy)
    with pytest.raises(SystemExit):
        parser.parse_args(["toy", "other-task"])
    args = parser.parse_args(["toy", "bigram-backcopy", "--out", str(tmp_path), "--steps", "1",
                              "--layers", "1", "--quiet", "--threads", "1", "--scale", "paper"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sink_mass" in out and "trigger accuracy" in out
    config = tokenprobe.load(str(tmp_path / "bigram-backcopy-L1")).model.config
    assert config.n_layer == 1 and config.n_embd == toy.ToyConfig().d_model
    args.scale = "small"
    assert args.func(args) == 0
    config = tokenprobe.load(str(tmp_path / "bigram-backcopy-L1")).model.config
    assert config.n_embd == toy.SCALES["small"]["d_model"]
    for bad in (["--steps", "0"], ["--layers", "1", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):  # argparse: must be a positive integer
            parser.parse_args(["toy", "bigram-backcopy", *bad])


# --- Guo et al.'s code (GuoTianYu2000/Active-Dormant-Attention @ 16b3593), mirrored -------------

def guo_meta(char_counts, bigrams) -> dict:
    """Their meta for one BOS and no delimiter from counts (BBM/data.py `MetaProcess.__init__`
    with `add_bos` and `add_delimiter` at delimiter_p = 0): characters 0..n-1, `<s_0>` = n and
    `<d>` = n + 1 are followed by the unigram and follow nothing; each row is normalised."""
    n = len(char_counts)
    counts = np.zeros((n + 2, n + 2))
    counts[:n, :n] = bigrams
    counts[n:, :n] = char_counts
    marginal = np.zeros(n + 2)
    marginal[:n] = char_counts
    return {"cond": counts / counts.sum(1, keepdims=True), "marginal": marginal / marginal.sum(),
            "bos": [n], "vocab_size": n + 2}


def guo_bbm_gen_seq(meta: dict, k: int, seq_length: int, rng) -> list[int]:
    """BBM/data.py: `Dataset.__init__` (fixed_special_toks: the top k of the marginal's
    argsort are the triggers), `Dataset.no_trigger_init` and `bbm.gen_seq`."""
    tok_range = list(range(meta["vocab_size"]))
    marginal, cond = meta["marginal"], meta["cond"]
    idxs = list(np.argsort(marginal)[len(tok_range) - k:])
    marginal2 = marginal.copy()
    marginal2[idxs] = 0
    marginal2 = marginal2 / marginal2.sum()
    seq = [i for i in tok_range if i in meta["bos"]]  # bos_init
    seq.append(rng.choice(tok_range, p=marginal2))  # custom_iid
    while len(seq) <= seq_length:  # seq_length + 1 tokens (its len(seq) == 1 branch: never)
        x, xp = seq[-1], seq[-2]
        x_markov = rng.choice(tok_range, p=cond[x])  # markov_transition, drawn at triggers too
        seq.append(xp if x in idxs else x_markov)
    return seq


class _Branch(Exception):
    def __init__(self, options: list[int]):
        self.options = options


class _ReplayRng:
    """Stands in for `np.random.Generator`: `choice` follows `path`, multiplying the chosen
    probabilities; past its end it raises `_Branch` with the possible choices."""

    def __init__(self, path: tuple[int, ...]):
        self.path, self.i, self.prob = path, 0, 1.0

    def choice(self, a, p):
        if self.i == len(self.path):
            raise _Branch([j for j in range(len(a)) if p[j] > 0])
        j = self.path[self.i]
        self.i, self.prob = self.i + 1, self.prob * float(p[j])
        return a[j]


def exact_law(generate) -> dict[tuple[int, ...], float]:
    """{sequence: probability} of `generate(rng)`, every path of its choices enumerated."""
    law, paths = {}, [()]
    while paths:
        rng = _ReplayRng(path := paths.pop())
        try:
            seq = tuple(int(x) for x in generate(rng))
        except _Branch as branch:
            paths += [path + (j,) for j in branch.options]
            continue
        law[seq] = law.get(seq, 0.0) + rng.prob
    return law


def sampler_law(task: toy.BigramTask, length: int, monkeypatch) -> dict:
    """The exact law of `task.sample(1, length=length)`, its torch.multinomial draws replayed."""
    current = {}

    def multinomial(probs, num_samples, replacement=False, *, generator=None):
        assert probs.shape[0] == 1 and num_samples == 1 and generator is not None
        return torch.tensor([[current["rng"].choice(range(probs.shape[1]), probs[0].tolist())]])

    def generate(rng):
        current["rng"] = rng
        return task.sample(1, length=length, generator=torch.Generator())[0]

    monkeypatch.setattr(torch, "multinomial", multinomial)
    return exact_law(generate)


# Hand-made counts whose every probability is a dyadic fraction, so both laws are exact floats:
# triggers 'b' (7) and 'd' (5); first token 'a' 3/4, 'c' 1/4; rows sum to 4, 2, 8 and 4.
COUNTS = (3, 7, 1, 5)
BIGRAMS = ((1, 2, 0, 1), (1, 0, 1, 0), (2, 3, 1, 2), (1, 1, 0, 2))


@pytest.mark.parametrize("specials_first", [False, True])
def test_sampler_without_smoothing_is_guo_bbm(monkeypatch, specials_first):
    task = toy.BigramTask(("a", "b", "c", "d"), COUNTS, BIGRAMS, n_triggers=2, smoothing=0.0,
                          specials_first=specials_first)
    theirs = exact_law(lambda rng: guo_bbm_gen_seq(guo_meta(COUNTS, BIGRAMS), 2, 5, rng))
    if specials_first:  # their ids -> tokenprobe's: characters + 2, BOS 4 -> 0, <d> 5 -> 1
        relabel = {0: 2, 1: 3, 2: 4, 3: 5, 4: 0, 5: 1}
        theirs = {tuple(relabel[i] for i in seq): p for seq, p in theirs.items()}
    assert sum(theirs.values()) == 1.0 and len(theirs) > 20
    assert sampler_law(task, 6, monkeypatch) == theirs  # same sequences, same probabilities
    smoothed = dataclasses.replace(task, smoothing=0.5)
    assert sampler_law(smoothed, 6, monkeypatch) != theirs  # the check can fail


def test_tiny_shakespeare_is_guo_vocabulary_and_statistics():
    task = toy.BigramTask.tiny_shakespeare()
    assert len(task.vocab) == 67 and (task.bos_id, task.delim_id) == (65, 66)
    assert task.vocab[65:] == [toy.BOS, toy.DELIM]  # their '<s_0>' and '<d>'
    assert list(task.chars) == sorted(task.chars) and task.chars[:2] == ("\n", " ")
    assert task.chars[-1] == "z" and task.smoothing == 0.0
    assert [task.vocab[i] for i in task.trigger_ids] == [" ", "e", "t"]  # ids 1, 43, 58
    assert sum(task.char_counts) == 1_115_394  # tiny-Shakespeare's characters
    assert sum(map(sum, task.bigrams)) == 1_115_393  # its adjacent pairs
    probs = task.transitions()
    # float64 values of their BBM/data/bos1_d0/config.yaml: cond['\n']['\n'], cond['!']['\n'],
    # cond[' '][' '], and no_trigger_init's first-token probabilities of '\n' and 'A'
    assert probs[0, 0] == 0.1805795144878622 and probs[2, 0] == 0.5658379373848987
    assert probs[task.bos_id, 0] == 0.05102808841126598
    assert probs[task.bos_id, 13] == 0.009974715582192217
    assert probs[:, 65:].sum() == 0 and probs[task.bos_id, task.trigger_ids].sum() == 0
    tokenizer = toy.char_tokenizer(task)
    assert tokenizer("First Citizen:\n")["input_ids"][:3] == [65, 18, 47]  # BOS, 'F', 'i'
    row = task.sample(1, length=257, generator=torch.Generator().manual_seed(0))[0]
    assert tokenizer(tokenizer.decode(row[1:].tolist()))["input_ids"] == row.tolist()


def test_from_text_guo_uses_their_tokenisation():
    task = toy.BigramTask.from_text_guo("ba\nab a", n_triggers=1)
    assert task.chars == ("\n", " ", "a", "b") and task.vocab[4:] == [toy.BOS, toy.DELIM]
    assert task.char_counts == (1, 1, 3, 2) and task.trigger_ids == [2]
    assert task.bigrams[3] == (0, 1, 1, 0) and sum(map(sum, task.bigrams)) == 6  # b: a, " "
    with pytest.raises(ValueError, match="never followed"):  # 'c' ends the text: no next token
        toy.BigramTask.from_text_guo("aab abc", n_triggers=1)


def test_faithful_config_and_optimiser():
    config = toy.ToyConfig.faithful()
    assert (config.data, config.arch, config.smoothing) == ("tiny_shakespeare", "guo", 0.0)
    assert (config.d_model, config.n_head, config.n_triggers) == (256, 1, 3)
    assert (config.seq_len, config.sample_len) == (256, 257)
    assert (config.batch_size, config.steps) == (512, 10_000)
    assert toy.ToyConfig.faithful(n_layer=3).n_layer == 3
    assert toy.ToyConfig(**toy.SCALES["guo"]) == config  # tokenprobe toy --scale guo
    model = toy.make_model(dataclasses.replace(config, d_model=16), 67, bos_id=65)
    optim = toy.make_optimizer(config, model)
    assert isinstance(optim, torch.optim.AdamW) and len(optim.param_groups) == 1
    group = optim.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        3e-4, 1e-4, (0.9, 0.99), 1e-8)
    assert len(group["params"]) == len(list(model.parameters()))
    default = toy.ToyConfig()  # the CPU default keeps its own choices
    assert (default.data, default.arch, default.smoothing, default.extra_token) == (
        "toy_text", "gpt2", 0.1, False)
    with pytest.raises(ValueError, match="arch"):
        toy.ToyConfig(arch="llama")


def guo_transformer_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """BBM/model.py `Transformer.forward` (pre_norm, learned positions, final norm, output),
    `TransformerBlock.forward`, `Attention.forward` and `FeedForward.forward`, on `model`'s
    weights. OPT's position table starts with two unused rows."""
    dec = model.model.decoder
    bs, slen = tokens.shape
    h = dec.embed_tokens(tokens) + dec.embed_positions.weight[2:2 + slen]
    mask = torch.full((1, 1, slen, slen), float("-inf")).triu(1)
    for layer in dec.layers:
        attn, x = layer.self_attn, layer.self_attn_layer_norm(h)
        q, k, v = (lin(x).view(bs, slen, attn.num_heads, attn.head_dim).transpose(1, 2)
                   for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(attn.head_dim) + mask, dim=-1)
        h = h + attn.out_proj((scores @ v).transpose(1, 2).reshape(bs, slen, -1))
        h = h + layer.fc2(torch.relu(layer.fc1(layer.final_layer_norm(h))))
    return model.lm_head(dec.final_layer_norm(h))


def test_faithful_model_is_guo_transformer():
    config = toy.ToyConfig.faithful(n_layer=2, d_model=32, n_head=2, seq_len=8)
    model = toy.make_model(config, 67, bos_id=65).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6 + 1 and all(m.bias is None for m in linears)
    for layer in model.model.decoder.layers:
        assert isinstance(layer.activation_fn, torch.nn.ReLU) and layer.fc1.out_features == 128
    embed = model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() != embed.data_ptr()  # untied
    assert 0.8 < float(embed.detach().std()) < 1.2  # PyTorch: N(0, 1); transformers: N(0, 0.02)
    tokens = toy.BigramTask.tiny_shakespeare().sample(
        3, length=9, generator=torch.Generator().manual_seed(0))  # 9 = sample_len
    with torch.no_grad():
        logits, targets = toy.next_token_logits(model, tokens, extra_token=True)
        torch.testing.assert_close(logits, guo_transformer_forward(model, tokens[:, :-1]))
    assert logits.shape == (3, 8, 67) and torch.equal(targets, tokens[:, 1:])


def test_tiny_faithful_training_saves_a_loadable_model(tmp_path, monkeypatch):
    config = toy.ToyConfig.faithful(d_model=32, seq_len=32, batch_size=2, steps=2,
                                    eval_sequences=4)
    lengths, sample = [], toy.BigramTask.sample
    monkeypatch.setattr(toy.BigramTask, "sample", lambda self, n, **kwargs: (
        lengths.append(kwargs["length"]), sample(self, n, **kwargs))[1])
    trained = toy.train_toy(config, progress=False, threads=1)
    assert lengths == [33, 33, 33]  # two batches, then the held-out set: seq_len + 1 tokens
    assert trained.task == toy.BigramTask.tiny_shakespeare()
    assert trained.info["triggers"] == [" ", "e", "t"]
    path = toy.save_toy(trained, tmp_path / "m")
    loaded = tokenprobe.load(str(path))
    model = loaded.model
    assert model.lm_head.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr()
    ids = toy.held_out(trained.task, 2, seed=0, length=32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained.model(ids).logits)
    assert toy.load_task(path)[0] == trained.task
    report = toy.toy_report(path, n_prompts=2)
    assert list(report.layer) == [0] and report.notna().all().all()
