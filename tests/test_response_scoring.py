"""Scoring the answer, not the question: prompt/response pairs and chat messages in a corpus,
the response's tokens marked, and quantiles, bands, forking and summaries over them only."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import tokenprobe
from tokenprobe.cli.args import EXIT_OK, EXIT_USAGE
from tokenprobe.cli.main import main
from tokenprobe.corpus import Corpus, CorpusError, Prompt
from tokenprobe.probes import EntropyConfig, EntropyProbe
from tokenprobe.runner import prompts_digest
from tokenprobe.tokens import PromptError, encode_scored

PAIRS = [{"prompt": "Q: what is two and two?\nA:", "response": " four, as two and two make four."},
         {"prompt": "Name a colour.", "response": " Blue is a colour of the sky."},
         {"text": "a plain text with no response at all, scored whole"}]
# A minimal chat template (ChatML-like, as SmolLM2's) for the byte-level tiny tokenizer.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_corpus_reads_pairs_and_chat_messages(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    got = list(Corpus([write_jsonl(tmp_path / "p.jsonl", [*PAIRS, chat])]))
    assert got[0] == Prompt(0, PAIRS[0]["prompt"], None, PAIRS[0]["response"])
    assert got[2] == Prompt(2, PAIRS[2]["text"], None)
    assert got[3].messages == (("user", "Hi?"), ("assistant", "Hello.")) and got[3].response is None
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,answer\nQ1,A1\n")
    assert list(Corpus([csv], response_column="answer")) == [Prompt(0, "Q1", None, "A1")]
    with pytest.raises(CorpusError, match='no "answer" response key'):
        list(Corpus([write_jsonl(tmp_path / "q.jsonl", PAIRS)], response_column="answer"))
    with pytest.raises(CorpusError, match="chat messages and a response"):
        list(Corpus([write_jsonl(tmp_path / "c.jsonl", [{**chat, "response": "x"}])]))
    with pytest.raises(CorpusError, match="item 0 is not a chat message"):
        list(Corpus([write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])]))
    with pytest.raises(PromptError, match="its response is empty"):
        list(Corpus([write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q", "response": " "}])]))


def test_a_response_is_tokenised_after_its_prompt(tiny_gemma3):
    tok = tiny_gemma3.tokenizer  # adds <bos>: the prompt keeps it, the response adds none
    pair = Prompt(0, "Q?", None, " ok")
    [(ids, cut, start)] = encode_scored(tok, [pair], context_length=None, truncate=False)
    head = tok("Q?")["input_ids"]
    assert ids == head + tok(" ok", add_special_tokens=False)["input_ids"] and not cut
    assert start == len(head) == 3 and ids[0] == tok.bos_token_id
    [(ids, cut, start)] = encode_scored(tok, [pair], context_length=None, truncate=False,
                                        max_tokens=2)  # cut inside the prompt: no response left
    assert cut and start == 2 == len(ids)
    assert encode_scored(tok, [Prompt(0, "Q?", None)], context_length=None,
                         truncate=False)[0][2] is None


def test_chat_messages_go_through_the_chat_template(tiny_llama):
    tok = tiny_llama.tokenizer
    chat = Prompt(0, "Hi?\nHello.", None, messages=(("user", "Hi?"), ("assistant", "Hello.")))
    with pytest.raises(PromptError, match="no chat template"):
        encode_scored(tok, [chat], context_length=None, truncate=False)
    tok.chat_template = TEMPLATE
    try:
        [(ids, _, start)] = encode_scored(tok, [chat], context_length=None, truncate=False)
    finally:
        tok.chat_template = None
    assert tok.decode(ids[:start]) == "<user>Hi?\n<assistant>"  # the generation prompt
    assert tok.decode(ids[start:]) == "Hello."


def test_response_only_scoring(tiny_llama, tmp_path):
    corpus = Corpus([write_jsonl(tmp_path / "p.jsonl", PAIRS)])
    run = tokenprobe.run(tiny_llama, corpus, ["entropy"], progress=False)
    tokens, prompts = run.tokens, run.prompts.set_index("prompt_id")
    tok = tiny_llama.tokenizer
    assert prompts.text[0] == PAIRS[0]["prompt"] + PAIRS[0]["response"]
    start = len(tok(PAIRS[0]["prompt"])["input_ids"])
    assert prompts.response_start.tolist()[:2] == [start, len(tok(PAIRS[1]["prompt"])["input_ids"])]
    assert pd.isna(prompts.response_start[2]) and tokens.in_response[tokens.prompt_id == 2].isna().all()
    first = tokens[tokens.prompt_id == 0]
    assert first.in_response.tolist() == [p >= start for p in first.pos]
    scored = (tokens.pos > 0) & tokens.in_response.fillna(True).astype(bool)
    # per-token statistics everywhere; bands and forking flags only where scored
    assert tokens.entropy[tokens.pos > 0].notna().all()
    assert tokens.band[~scored].isna().all() and tokens.forking[~scored].isna().all()
    assert tokens.band[scored].notna().all()
    h = tokens.entropy[scored]
    k = max(1, int(len(h) * 0.2 + 0.9999))
    assert int(tokens.forking[scored].sum()) == k
    assert set(tokens.index[tokens.forking.fillna(False).astype(bool)]) == set(h.nlargest(k).index)
    assert (tokens.band[scored] == "high").sum() == (h >= np.quantile(h, 0.8)).sum()
    for i, g in tokens[scored].groupby("prompt_id"):
        assert prompts.mean_entropy[i] == pytest.approx(g.entropy.mean())
        assert prompts.perplexity[i] == pytest.approx(math.exp(-g.logprob.mean()))
        assert prompts.forking_share[i] == pytest.approx(g.forking.astype(float).mean())
    summary = run.meta["summary"]["entropy"]
    assert summary["n_scored"] == len(h) and summary["score"] == "response"
    assert summary["forking_k"] == k
    # score="all": every token after the first, as if the texts had no response
    every = tokenprobe.run(tiny_llama, corpus, [EntropyProbe(EntropyConfig(score="all"))],
                           progress=False).tokens
    assert every.forking[every.pos > 0].notna().all()
    assert int(every.forking.sum()) == max(1, int((every.pos > 0).sum() * 0.2 + 0.9999))
    np.testing.assert_allclose(every.entropy, tokens.entropy)  # same tokens, same statistics


def test_pairs_from_python_and_per_prompt_quantiles_over_the_response(tiny_llama):
    run = tokenprobe.run(tiny_llama, PAIRS[:1], [EntropyProbe(EntropyConfig(
        quantiles_over="prompt"))], progress=False)
    tokens = run.tokens
    scored = tokens.in_response.fillna(False).astype(bool) & (tokens.pos > 0)
    k = max(1, int(scored.sum() * 0.2 + 0.9999))
    assert 0 < scored.sum() < len(tokens) - 1
    assert int(tokens.forking[scored].sum()) == k and tokens.forking[~scored].isna().all()


def test_the_response_is_part_of_what_identifies_a_part():
    base = [Prompt(0, "Q", None, "A")]
    assert prompts_digest(base) != prompts_digest([Prompt(0, "Q", None, "B")])
    assert prompts_digest(base) != prompts_digest([Prompt(0, "QA", None)])
    assert prompts_digest([Prompt(0, "QA", None)]) == prompts_digest([Prompt(0, "QA", None, None)])


def test_cli_scores_the_response(capsys, tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    code = main(["run", "--model", "tiny-llama", "--prompts", str(source), "--probes", "entropy",
                 "--out", str(tmp_path / "r"), "--quiet"])
    assert code == EXIT_OK
    run = tokenprobe.open_run(tmp_path / "r")
    assert run.meta["summary"]["entropy"]["score"] == "response"
    assert run.tokens.in_response.any()
    code = main(["run", "--model", "tiny-llama", "--prompts", str(source), "--probes", "entropy",
                 "--score", "all", "--out", str(tmp_path / "all"), "--quiet"])
    assert code == EXIT_OK
    assert tokenprobe.open_run(tmp_path / "all").meta["summary"]["entropy"]["score"] == "all"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--model", "tiny-llama", "--prompts", str(source), "--score", "answer",
              "--out", str(tmp_path / "bad"), "--quiet"])
    assert stopped.value.code == EXIT_USAGE
    assert "--score: must be one of response, all" in capsys.readouterr().err
