"""The Bigram-Backcopy toy: sampler rule, tokenizer round trip, saved models, sink emergence."""
from __future__ import annotations

import argparse
import dataclasses

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
