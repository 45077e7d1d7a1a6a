"""Two models with different tokenisers compared on character spans: segmentation, the alignment
rule on hand-built tokenisations, surprisals of the tiny byte-level pair against an explicit
softmax, the run, the CLI (its errors, and both embedded models), the report and the dashboard."""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

import tokenprobe
from tokenprobe.analyses import spans_views
from tokenprobe.analyses.report import write_report
from tokenprobe.analyses.spans import (compare_spans, span_measures, spans_run, summarize,
                                       tokenise)
from tokenprobe.analyses.spans_segment import segment
from tokenprobe.app import runs
from tokenprobe.cli.main import main
from tokenprobe.store import Run

PROMPTS = ["The cat sat on the mat.", "  naïve café, 日本語 🙂\n\tok  ", "Hi! Bye? Yes."]
DASHBOARD = str(Path(runs.__file__).with_name("dashboard.py"))


def texts(text: str, spans) -> list[str]:
    return [text[a:b] for a, b in spans]


# ---- segmentation ----------------------------------------------------------------------------

def test_words_carry_their_leading_whitespace_and_tile_the_text():
    text = "  The cat\n\tsat.  "
    spans = segment(text)
    assert texts(text, spans) == ["  The", " cat", "\n\tsat.  "]
    for unit, kw in [("word", {}), ("sentence", {}), ("regex", {"pattern": r"\w+"}),
                     ("offsets", {"cuts": [3, 9]})]:
        for t in PROMPTS + [text]:
            cut = segment(t, unit, **kw) if unit != "offsets" or len(t) > 9 else None
            if cut is None:
                continue
            assert "".join(texts(t, cut)) == t, (unit, t)  # they tile: nothing lost, no overlap
            assert all(b > a for a, b in cut) and cut[0][0] == 0 and cut[-1][1] == len(t)


def test_sentences_regex_and_offsets():
    text = 'He left. "Why?" she said!\n\nNew para… ok'
    assert texts(text, segment(text, "sentence")) == [
        "He left.", ' "Why?"', " she said!", "\n\nNew para…", " ok"]
    assert texts("a-b c", segment("a-b c", "regex", pattern=r"\w+")) == ["a", "-b", " c"]
    assert texts("x = 1;", segment("x = 1;", "regex", pattern=r"\w+")) == ["x", " = 1;"]
    assert segment("abcdef", "offsets", cuts=[2, 4]) == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.parametrize("text, unit, kw, message", [
    ("   ", "word", {}, "empty or whitespace"),
    ("abc", "regex", {"pattern": "("}, "bad regular expression"),
    ("abc", "regex", {"pattern": r"\d+"}, "matches nothing"),
    ("abc", "regex", {}, "unit regex needs one"),
    ("abc", "word", {"pattern": "a"}, "a pattern goes with unit regex"),
    ("abc", "offsets", {"cuts": [2, 1]}, "increase strictly"),
    ("abc", "offsets", {"cuts": [0]}, "increase strictly"),
    ("abc", "phrase", {}, "unknown unit"),
])
def test_bad_segmentation_is_refused(text, unit, kw, message):
    with pytest.raises(ValueError, match=message):
        segment(text, unit, **kw)


# ---- the alignment rule (hand-built tokenisations) ---------------------------------------

def test_a_token_straddling_a_word_edge_makes_both_words_inexact():
    """'the cat sat' as 'the c' | 'at' | ' sat': the first token crosses the edge at 3. All
    its surprisal goes to 'the' (where it starts), ' cat' keeps only 'at', and ' cat''s first
    token is 'at' (its predicting entropy); ' sat' is untouched and exact."""
    text = "the cat sat"
    spans = segment(text)
    starts, ends = np.array([0, 5, 7]), np.array([5, 7, 11])
    logprob, entropy = np.array([-1.0, -2.0, -4.0]), np.array([0.5, 0.25, 0.125])
    got = span_measures(starts, ends, logprob, entropy, spans)
    assert got.surprisal.tolist() == [1.0, 2.0, 4.0]
    assert got.n_tokens.tolist() == [1, 1, 1]
    assert got.entropy_first.tolist() == [0.5, 0.25, 0.125]
    assert got.exact.tolist() == [False, False, True]
    assert got.surprisal.sum() == -logprob.sum()


def test_a_span_with_no_token_starting_in_it():
    """'a' | 'b' | ' cd' tokenised 'ab c' | 'd': the first token starts in 'a' and covers 'b'
    whole, so 'b' gets 0 nats and no first entropy, and every span has a straddled edge."""
    spans = [(0, 1), (1, 2), (2, 5)]  # 'a' | 'b' | ' cd'
    got = span_measures(np.array([0, 4]), np.array([4, 5]), np.array([-3.0, -1.0]),
                        np.array([1.0, 2.0]), spans)
    assert got.surprisal.tolist() == [3.0, 0.0, 1.0]
    assert got.n_tokens.tolist() == [1, 0, 1]
    assert math.isnan(got.entropy_first[1]) and got.entropy_first[2] == 2.0
    assert got.exact.tolist() == [False, False, False]


def test_byte_pieces_of_one_character_share_its_offsets():
    """GPT-2 byte BPE splits '日' (3 bytes) into pieces that each carry the character's
    offsets (26, 28 for ' 日'-with-its-space, then 27, 28 twice): the edges at 26 and 28 are
    token boundaries, 27 is not (the first piece ends inside 日)."""
    spans = [(0, 26), (26, 28), (28, 30)]
    starts, ends = np.array([0, 26, 27, 27, 28]), np.array([26, 28, 28, 28, 30])
    got = span_measures(starts, ends, -np.ones(5), np.zeros(5), spans)
    assert got.exact.tolist() == [True, True, True] and got.n_tokens.tolist() == [1, 3, 1]
    split = span_measures(starts, ends, -np.ones(5), np.zeros(5), [(0, 27), (27, 30)])
    assert split.exact.tolist() == [False, False]
    assert split.n_tokens.tolist() == [2, 3]  # the pieces count where they start


def test_the_span_sum_is_the_token_sum_whatever_the_straddling():
    rng = np.random.default_rng(0)
    text_len = 60
    cuts = np.sort(rng.choice(np.arange(1, text_len), 25, replace=False))
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [text_len]])
    logprob = -rng.exponential(2.0, len(starts))
    spans = segment("x" * text_len, "offsets", cuts=list(range(7, text_len, 7)))
    got = span_measures(starts, ends, logprob, np.zeros(len(starts)), spans)
    assert not got.exact.all() and got.exact.any()
    assert got.surprisal.sum() == pytest.approx(-logprob.sum(), rel=1e-12)
    assert got.n_tokens.sum() == len(starts)


def test_unscored_first_token_leaves_its_span_undefined():
    got = span_measures(np.array([0, 3]), np.array([3, 7]), np.array([np.nan, -1.0]),
                        np.array([np.nan, 1.0]), [(0, 3), (3, 7)])
    assert math.isnan(got.surprisal[0]) and not got.exact[0] and got.exact[1]


# ---- tiny byte-level pair: exact everywhere, against an explicit softmax -----------------

def reference(loaded, text: str, spans, bos_first: bool) -> tuple[list[float], list[float]]:
    """Per span: -log p(span | prefix) and the entropy of the distribution before its first
    byte, from an explicit float64 softmax over one unpadded sequence, with the byte
    positions of each span counted from its UTF-8 encoding."""
    tok = loaded.tokenizer
    ids = tok(text)["input_ids"]
    ids = ids if bos_first else [tok.bos_token_id, *ids]  # "auto" gives tiny-llama its <bos>
    assert len(ids) == len(text.encode("utf-8")) + 1
    with torch.no_grad():
        z = loaded.model(input_ids=torch.tensor([ids])).logits[0].double()
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)  # row k predicts token k + 1 = byte k
    nll = [-math.log(p[k, ids[k + 1]].item()) for k in range(len(ids) - 1)]
    entropy = [-(p[k] * torch.log(p[k])).sum().item() for k in range(len(ids) - 1)]
    out_s, out_h = [], []
    for a, b in spans:
        lo, hi = len(text[:a].encode()), len(text[:b].encode())
        out_s.append(sum(nll[lo:hi]))
        out_h.append(entropy[lo])
    return out_s, out_h


@pytest.mark.parametrize("unit, kw", [("word", {}), ("sentence", {}),
                                      ("regex", {"pattern": r"\S"})])
def test_tiny_pair_is_exact_and_matches_an_explicit_softmax(tiny_llama, tiny_gemma3, unit, kw):
    spans = compare_spans(tiny_llama, tiny_gemma3, PROMPTS, unit=unit, batch_size=2, **kw)
    assert spans.exact_a.all() and spans.exact_b.all() and spans.exact.all()
    for pid, text in enumerate(PROMPTS):
        rows = spans[spans.prompt_id == pid]
        cut = list(zip(rows.char_start, rows.char_end))
        assert "".join(rows.text) == text
        for side, loaded, bos in (("a", tiny_llama, False), ("b", tiny_gemma3, True)):
            want_s, want_h = reference(loaded, text, cut, bos)
            assert rows[f"surprisal_{side}"].to_numpy() == pytest.approx(want_s, abs=2e-4)
            assert rows[f"entropy_first_{side}"].to_numpy() == pytest.approx(want_h, abs=2e-4)
            assert (rows[f"n_tokens_{side}"].to_numpy()
                    == [len(t.encode()) for t in rows.text]).all()
    assert (spans.surprisal_diff == spans.surprisal_b - spans.surprisal_a).all()


def test_start_tokens(tiny_llama, tiny_gemma3):
    plain = tokenise(tiny_llama.tokenizer, "é")
    assert plain.ids[0] == tiny_llama.tokenizer.bos_token_id and plain.start_token == "<bos>"
    assert plain.starts.tolist() == [0, 0] and plain.ends.tolist() == [1, 1]  # two bytes, é
    own = tokenise(tiny_gemma3.tokenizer, "é")
    assert own.ids.count(tiny_gemma3.tokenizer.bos_token_id) == 1 and own.start_token is None
    bare = tokenise(tiny_llama.tokenizer, "ab", start_token=None)
    assert bare.text_pos.tolist() == [0, 1]
    spans = compare_spans(tiny_llama, tiny_gemma3, ["ab cd"], start_token=None)
    assert math.isnan(spans.surprisal_a[0]) and not spans.exact_a[0]  # first byte unscored
    assert spans.exact_b.all() and summarize(spans)["n_exact"] == 1


def test_byte_jsd_is_read_at_each_spans_first_byte(tiny_llama, tiny_gemma3, monkeypatch):
    """`byte_jsd` asks analyses/bytelevel for the byte offset of each span's first character
    (not its character offset: 'é' and '日' are 2 and 3 bytes) and stores its jsd there."""
    from tokenprobe.analyses import bytelevel

    asked = []

    def fake(model_a, tok_a, model_b, tok_b, text, *, positions, prune="prefix"):
        asked.append((text, list(positions)))
        return pd.DataFrame({"byte_offset": positions, "jsd": [p / 100 for p in positions]})

    monkeypatch.setattr(bytelevel, "byte_divergence", fake)
    texts_ = ["é 日本 x", "ab cd"]
    spans = compare_spans(tiny_llama, tiny_gemma3, texts_, byte_jsd=True)
    assert asked == [("é 日本 x", [0, 2, 9]), ("ab cd", [0, 2])]
    assert spans.jsd_byte.tolist() == [0.0, 0.02, 0.09, 0.0, 0.02]
    assert summarize(spans)["mean_jsd_byte"] == pytest.approx(0.026)
    assert "jsd_byte" not in compare_spans(tiny_llama, tiny_gemma3, texts_)


# ---- the run, the report and the dashboard ---------------------------------------------------

@pytest.fixture(scope="module")
def spans_root(tiny_llama, tiny_gemma3, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spans-runs")
    spans_run(tiny_llama, tiny_gemma3, PROMPTS, out=root / "pair")
    return root


def test_the_run_names_both_models_and_keeps_the_sums(spans_root, tiny_llama):
    run = tokenprobe.open_run(spans_root / "pair")
    assert run.meta["model"] == "tiny-llama" and run.meta["model_b"] == "tiny-gemma3"
    assert run.meta["models"]["b"]["weights_fingerprint"].startswith("sha256:")
    assert run.meta["models"]["a"]["start_token"] == "<bos>"
    assert set(run.meta["tables"]) == {"prompts", "tokens", "span_tokens", "spans"}
    assert run.meta["summary"]["spans"] == summarize(run.spans)
    for side in "ab":
        tokens = run.span_tokens[(run.span_tokens.model == side) & run.span_tokens.span_id.notna()]
        per_prompt = -tokens.groupby("prompt_id").logprob.sum()
        assert run.prompts[f"surprisal_{side}"].to_numpy() == pytest.approx(per_prompt.to_numpy())
    assert run.prompts.n_tokens.tolist() == [len(t.encode()) + 1 for t in PROMPTS]  # + <bos>


def test_report_shows_the_span_comparison(spans_root, tmp_path):
    out = write_report([spans_root / "pair"], tmp_path / "rep", static=False)
    page = (out / "report.html").read_text(encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "Span comparison: tiny-llama (A) vs tiny-gemma3 (B)" in page
    assert "r0_spans_scatter" in manifest["figures"]
    assert {"r0_spans_summary", "r0_spans_disagree"} <= set(manifest["tables"])
    summary = pd.read_csv(out / "tables" / "r0_spans_summary.csv").iloc[0]
    run = tokenprobe.open_run(spans_root / "pair")
    assert summary.mean_abs_diff_exact == pytest.approx(summarize(run.spans)["mean_abs_diff_exact"])
    assert page.count('class="tp-span"') == (run.spans.prompt_id < 2).sum()  # 2 prompts shown


def test_span_html_is_text_never_markup():
    frame = pd.DataFrame({"span_id": [0, 1], "char_start": [0, 8], "char_end": [8, 11],
                          "text": ["<b>x</b>", " \x1b]"], "surprisal_a": [1.0, 2.0],
                          "surprisal_b": [2.0, np.nan], "n_tokens_a": [1, 1],
                          "n_tokens_b": [1, 1], "exact": [True, False],
                          "surprisal_diff": [1.0, np.nan]})
    page = spans_views.span_html(frame, "surprisal_b", names=("<i>A</i>", "B"))
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "\x1b" not in page and "<i>A</i>" not in page
    assert page.count('data-exact="false"') == 1 and "#ffffff" in page  # NaN: no colour


def test_dashboard_shows_the_spans_tab(spans_root, monkeypatch):
    run = tokenprobe.open_run(spans_root / "pair")
    marked = run.spans.copy()
    marked.loc[1, ["exact_a", "exact"]] = False  # one inexact span, as a BPE model would give
    Run({**{n: run.tables[n] for n in run.tables}, "spans": marked}, run.meta).save(
        spans_root / "marked")
    monkeypatch.setenv(runs.ROOT_ENV, str(spans_root))
    at = AppTest.from_file(DASHBOARD, default_timeout=60)
    at.query_params.update(run="marked")
    at.run()
    assert not at.exception and not at.error
    assert [t.label for t in at.tabs][0] == "Spans"
    blocks = [h.value for h in at.html if 'class="tp-span"' in h.value]
    assert len(blocks) == 3  # surprisal under A, under B, and B - A
    assert "surprisal under tiny-llama" in blocks[0] and "tiny-gemma3 - tiny-llama" in blocks[2]
    for block in blocks:
        shown = html.unescape("".join(re.findall(r'class="tp-span"[^>]*>(.*?)</span>', block)))
        assert shown.replace("↵<br>", "\n").replace("⇥", "\t") == PROMPTS[0]
        assert block.count('data-exact="false"') == 1
    assert len(at.get("plotly_chart")) == 1
    at.selectbox(key="run-prompt").set_value(1).run()
    assert not at.exception and "日本語" in at.html[0].value


# ---- the CLI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--unit", "regex", "--pattern", "("], "bad regular expression"),
    (["--prompt", "x", "--unit", "regex"], "--unit regex needs --pattern"),
    (["--prompt", "x", "--pattern", "x"], "--pattern goes with --unit regex"),
    (["--prompt", "abc", "--unit", "regex", "--pattern", r"\d"], "prompt 0: the pattern"),
    (["--prompt", "  "], "prompt 0 is empty or whitespace only"),
    ([], "give prompts with --prompt"),
])
def test_cli_refuses_bad_input_before_any_model_loads(argv, message, tmp_path, capsys,
                                                      monkeypatch):
    loaded = []
    monkeypatch.setattr(tokenprobe, "load", lambda name, **kw: loaded.append(name))
    code = main(["spans", "--model", "tiny-llama", "--vs", "tiny-gemma3", *argv,
                 "--out", str(tmp_path / "r")])
    assert code == 2 and message in capsys.readouterr().err
    assert loaded == [] and not (tmp_path / "r").exists()


def test_cli_unknown_model_and_taken_out(spans_root, tmp_path, capsys):
    assert main(["spans", "--model", "tiny-llama", "--vs", "no-such-model", "--prompt", "x",
                 "--out", str(tmp_path / "r")]) == 3
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["spans", "--model", "tiny-llama", "--vs", "tiny-gemma3", "--prompt", "x",
                 "--out", str(spans_root / "pair")]) == 4


def test_cli_help_explains_surprisal_and_exactness(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["spans", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "-log p(span | everything before it)" in out and "straddles" in out


@pytest.mark.embedded
def test_cli_on_the_embedded_models(tmp_path, capsys):
    """SmolLM2 (byte BPE, no BOS) vs Gemma 3 (SentencePiece, <bos>), split at punctuation:
    SmolLM2's "'t" and "'s" straddle the apostrophe's edges, Gemma's tokens do not."""
    out = tmp_path / "r"
    assert main(["spans", "--model", "smollm2-135m", "--vs", "gemma3-270m", "--prompt",
                 "Don't panic: it's 10:30.", "--unit", "regex", "--pattern", r"\w+|[^\w\s]",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "A smollm2-135m vs B gemma3-270m" in printed and "spans exact for both" in printed
    run = tokenprobe.open_run(out)
    spans = run.spans
    assert run.meta["models"]["a"]["start_token"] == "<|endoftext|>"
    assert spans.text[~spans.exact_a].tolist() == ["'", "t", "'", "s"]
    assert spans.exact_b.all() and spans.surprisal_a.notna().all()
    for side in "ab":
        tokens = run.span_tokens[(run.span_tokens.model == side) & run.span_tokens.span_id.notna()]
        assert spans[f"surprisal_{side}"].sum() == pytest.approx(-tokens.logprob.sum())
        assert (spans[f"surprisal_{side}"] > 0).sum() == spans[f"n_tokens_{side}"].gt(0).sum()
    assert spans_views.disagreements(spans, 3).exact.all()
