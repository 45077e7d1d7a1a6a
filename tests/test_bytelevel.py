"""Exact next-byte probabilities (Phan et al. 2024) against brute-force enumeration, hand-computed
cases, byte tokenizers and the two embedded models."""
from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenprobe.analyses import bytelevel as bl

# A byte-level BPE over the bytes of "ab " with multi-byte tokens; 'Ġ' is the space. No merge
# makes 'bb': the tokenizer never emits it, so every cover ending in it is not canonical.
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PIECES = {3: b"a", 4: b"b", 5: b" ", 6: b"ab", 7: b" a", 8: b"ba", 9: b" ab", 10: b"aa",
          11: b"bb"}
MERGES = [("a", "b"), ("Ġ", "a"), ("b", "a"), ("Ġ", "ab"), ("a", "a")]


def tiny_bpe() -> PreTrainedTokenizerFast:
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab |= {piece.decode().replace(" ", "Ġ"): i for i, piece in PIECES.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def tiny_model(*, zero: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(PIECES), hidden_size=16,
                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).double().eval()  # float64: tight tolerances
    if zero:  # every hidden state 0, so every next-token distribution uniform over 12 ids
        for p in model.parameters():
            p.data.zero_()
    return model


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def decode(t: tuple[int, ...]) -> bytes:
    return b"".join(PIECES[i] for i in t)


@functools.lru_cache(maxsize=None)
def is_valid(tok, t: tuple[int, ...], prune: str) -> bool:
    """The pruning rules, written from their definitions."""
    check = {"none": (), "prefix": t[:-1], "canonical": t}[prune]
    return tuple(tok(decode(check).decode(), add_special_tokens=False)["input_ids"]) == check


@functools.lru_cache(maxsize=None)
def brute_covers(prefix: bytes) -> list[tuple[int, ...]]:
    """Every token sequence of at most len(prefix) tokens satisfying the lemma's cover condition."""
    return [t for k in range(1, len(prefix) + 1) for t in itertools.product(PIECES, repeat=k)
            if decode(t).startswith(prefix) and len(decode(t[:-1])) < len(prefix)]


class Oracle:
    """P(t_1..t_k | <bos>) and P(special token next | t) from plain forwards of the model on
    (<bos>,) + t, right-padded in batches; every prefix of a forwarded sequence is memoised."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    def _run(self, seqs: list[tuple[int, ...]]) -> None:
        width = 1 + max(map(len, seqs))
        ids = torch.tensor([(1,) + t + (0,) * (width - 1 - len(t)) for t in seqs])
        mask = torch.tensor([[1] * (1 + len(t)) + [0] * (width - 1 - len(t)) for t in seqs])
        with torch.no_grad():
            logp = self.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        for b, t in enumerate(seqs):
            total = 0.0
            for j in range(len(t) + 1):
                self.memo[t[:j]] = (total, float(logp[b, j, :3].exp().sum()))
                total += float(logp[b, j, t[j]]) if j < len(t) else 0.0

    def logprob(self, t: tuple[int, ...]) -> float:
        if t not in self.memo:
            self._run([t])
        return self.memo[t][0]

    def special(self, t: tuple[int, ...]) -> float:
        self.logprob(t)
        return self.memo[t][1]

    def prefix_prob(self, tok, prefix: bytes, prune: str) -> float:
        covers = [t for t in brute_covers(prefix) if is_valid(tok, t, prune)]
        missing = [t for t in covers if t not in self.memo]
        for k in range(0, len(missing), 256):
            self._run(missing[k:k + 256])
        return sum(math.exp(self.logprob(t)) for t in covers)


@pytest.fixture(scope="module")
def oracle(model):
    return Oracle(model)


PREFIXES = [bytes(p) for k in (1, 2) for p in itertools.product(b"ab ", repeat=k)] + \
    [b"aab", b"aba", b" ab", b"ba ", b"abab", b" aba", b"ab a", b"aaaa"]


def test_byte_view_of_the_tiny_bpe(bpe):
    assert bl.token_bytes(bpe) == [None] * 3 + list(PIECES.values())
    assert bl.leading_ids(bpe) == [1]


@pytest.mark.parametrize("prune", ["none", "prefix", "canonical"])
def test_cover_encodings_are_the_brute_force_covers(bpe, prune):
    for prefix in PREFIXES:
        want = {t for t in brute_covers(prefix) if is_valid(bpe, t, prune)}
        assert set(bl.cover_encodings(prefix, bpe, prune=prune)) == want, prefix


@pytest.mark.parametrize("prune", ["none", "prefix", "canonical"])
def test_prefix_and_next_byte_probabilities_match_enumeration(bpe, model, oracle, prune):
    vocab = bl.byte_vocab(bpe)
    for prefix in PREFIXES:
        want = oracle.prefix_prob(bpe, prefix, prune)
        got = bl.prefix_logprob(model, bpe, prefix, prune=prune, vocab=vocab)
        assert math.exp(got) == pytest.approx(want, rel=1e-9), prefix
    for prefix in [b""] + PREFIXES[:12]:
        joint = torch.zeros(256, dtype=torch.float64)
        for b in b"ab ":
            joint[b] = oracle.prefix_prob(bpe, prefix + bytes([b]), prune)
        base = oracle.prefix_prob(bpe, prefix, prune) if prefix else 1.0
        raw = bl.next_byte_logprobs(model, bpe, prefix, prune=prune, normalize=False, vocab=vocab)
        norm = bl.next_byte_logprobs(model, bpe, prefix, prune=prune, vocab=vocab)
        torch.testing.assert_close(raw.exp(), joint / base, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(norm.exp(), joint / joint.sum(), rtol=1e-9, atol=1e-15)
        assert norm.exp().sum() == pytest.approx(1.0, abs=1e-12)
        assert set(torch.isfinite(raw).nonzero().flatten().tolist()) <= set(b"ab ")
        assert not raw.requires_grad and raw.grad_fn is None  # the weights require grad


def test_unpruned_next_bytes_lose_exactly_the_mass_of_ending(bpe, model, oracle):
    """Without pruning, sum_b P(x b) = P(x) - sum over the exact tokenizations t of x of
    P(t) P(special | t): the missing mass is the text ending (EOS, pad, BOS) right after x."""
    for prefix in [b"a", b"ab", b" a", b"aba", b"aa "]:
        exact = [t for t in brute_covers(prefix) if decode(t) == prefix]
        ending = sum(math.exp(oracle.logprob(t)) * oracle.special(t) for t in exact)
        raw = bl.next_byte_logprobs(model, bpe, prefix, prune="none", normalize=False)
        total = oracle.prefix_prob(bpe, prefix, "none")
        assert float(raw.exp().sum()) == pytest.approx(1 - ending / total, rel=1e-9)


def test_hand_computed_probabilities_under_a_uniform_model(bpe):
    """Every next-token probability is p = 1/12. P('aab'): covers [a,ab], then [aa] or [a,a]
    followed by b, ba or bb; prefix pruning drops the three starting [a,a] (not
    encode('aa')), the authors' rule keeps only [a,ab], the one canonical sequence."""
    uniform = tiny_model(zero=True)
    p = Fraction(1, 12)
    want = {"none": 4 * p**2 + 3 * p**3, "prefix": 4 * p**2, "canonical": p**2}
    for prune, value in want.items():
        got = bl.prefix_logprob(uniform, bpe, b"aab", prune=prune)
        assert math.exp(got) == pytest.approx(float(value), rel=1e-9), prune
    # after 'a', in units of p^2: 'aa' <- [aa] (12), [a,a], [a,ab], [a,aa]; 'ab' <- [ab] (12),
    # [a,b], [a,ba], [a,bb]; 'a ' <- [a,Ġ], [a,Ġa], [a,Ġab]. Canonical: [aa], [a,ab]; [ab].
    for prune, (aa, ab, sp) in {"none": (15, 15, 3), "canonical": (13, 12, 3)}.items():
        got = bl.next_byte_logprobs(uniform, bpe, b"a", prune=prune).exp()
        total = aa + ab + sp
        assert got[[97, 98, 32]].tolist() == pytest.approx([aa / total, ab / total, sp / total],
                                                           rel=1e-9)
    raw = bl.next_byte_logprobs(uniform, bpe, b"a", prune="none", normalize=False).exp()
    assert float(raw.sum()) == pytest.approx(33 / 36, rel=1e-9)  # P('a') 3p, [a] + special 3p^2


def byte_ids(tok) -> torch.Tensor:
    """(256,) the id of each byte's token in a byte tokenizer."""
    pieces = bl.token_bytes(tok)
    ids = {p[0]: i for i, p in enumerate(pieces) if p is not None}
    assert len(ids) == 256 and all(len(p) == 1 for p in pieces if p is not None)
    return torch.tensor([ids[b] for b in range(256)])


def token_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of a plain forward."""
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_byte_tokenizer_bytes_are_the_token_logprobs(tiny_gemma3, tiny_llama):
    """One token per byte: one cover per prefix, so the byte model is the token model."""
    text = "hi there, né"
    data, tok = text.encode(), tiny_gemma3.tokenizer
    logp = token_logprobs(tiny_gemma3, tok(text)["input_ids"])[:, byte_ids(tok)]  # (T, 256)
    for n in range(len(data)):
        raw = bl.next_byte_logprobs(tiny_gemma3.model, tok, data[:n], normalize=False)
        torch.testing.assert_close(raw, logp[n], rtol=0, atol=1e-5)
    frame = bl.byte_divergence(tiny_llama.model, tiny_llama.tokenizer, tiny_gemma3.model, tok,
                               text, positions="all")
    want_b = logp.log_softmax(-1)[range(len(data)), list(data)]  # renormalised over bytes
    torch.testing.assert_close(torch.tensor(frame.logp_b.values), want_b, atol=1e-5, rtol=0)
    # tiny-llama adds no BOS: conditioned on its first word 'hi', NaN before the space
    ids_a = tiny_llama.tokenizer(text)["input_ids"]
    norm_a = token_logprobs(tiny_llama, ids_a)[:, byte_ids(tiny_llama.tokenizer)].log_softmax(-1)
    want_a = torch.stack([norm_a[n - 1, data[n]] for n in range(2, len(data))])
    assert frame.logp_a[:2].isna().all()
    torch.testing.assert_close(torch.tensor(frame.logp_a.values[2:]), want_a, atol=1e-5, rtol=0)
    assert frame.char_offset.tolist() == list(range(11)) + [11, 11]  # é is bytes 11 and 12
    assert frame.byte_offset.tolist() == list(range(len(data)))


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) in nats, term by term."""
    return float(sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0))


def test_divergence_columns_match_their_definitions(tiny_gemma3, model, bpe):
    text = "ab ba aab"
    frame = bl.byte_divergence(model, bpe, tiny_gemma3.model, tiny_gemma3.tokenizer, text,
                               positions="all")
    for row in frame.itertuples():
        pa = bl.next_byte_logprobs(model, bpe, text.encode()[:row.byte_offset]).exp()
        pb = bl.next_byte_logprobs(tiny_gemma3.model, tiny_gemma3.tokenizer,
                                   text.encode()[:row.byte_offset]).exp()
        m = (pa + pb) / 2
        assert row.kl_ab == pytest.approx(kl(pa, pb), rel=1e-6)
        assert row.jsd == pytest.approx(0.5 * kl(pa, m) + 0.5 * kl(pb, m), rel=1e-6)
        assert row.entropy_b == pytest.approx(-sum(float(p * p.log()) for p in pb if p > 0))
        assert math.isinf(row.kl_ba)  # the tiny BPE puts no mass outside 'ab '
    same = bl.byte_divergence(model, bpe, model, bpe, text, positions=[0, 3, 8])
    assert same.kl_ab.abs().max() < 1e-12 and same.jsd.abs().max() < 1e-12


def test_bad_arguments_are_refused(model, bpe):
    with pytest.raises(ValueError, match="unknown prune"):
        bl.prefix_logprob(model, bpe, b"a", prune="valid")
    with pytest.raises(ValueError, match="positions"):
        bl.byte_divergence(model, bpe, model, bpe, "ab", positions="words")
    with pytest.raises(ValueError, match="byte offsets"):
        bl.byte_divergence(model, bpe, model, bpe, "ab", positions=[2])
    with pytest.raises(ValueError, match="adds no BOS"):
        bl.prefix_logprob(model, bpe, b"a", start_ids=[])


SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.mark.embedded
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_embedded_byte_view_round_trips(fixture, request):
    tok = request.getfixturevalue(fixture).tokenizer
    pieces = bl.token_bytes(tok)
    for text in [SENTENCE, "naïve  café\n\n\tdone — 日本語 ok"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == text.encode()


@pytest.mark.embedded
def test_embedded_divergence_is_finite_and_bounded(smollm2, gemma3):
    frame = bl.byte_divergence(smollm2.model, smollm2.tokenizer, gemma3.model,
                               gemma3.tokenizer, SENTENCE)
    assert frame.byte_offset.tolist() == [0, 4, 10, 16, 20, 26, 31, 35, 40]
    assert frame.iloc[0][["logp_a", "entropy_a", "jsd"]].isna().all()  # SmolLM2: no BOS
    rest = frame.iloc[1:]
    assert rest.notna().all().all() and frame.logp_b.notna().all()
    assert (rest.logp_a < 0).all() and (frame.logp_b < 0).all()
    assert ((rest.entropy_a > 0) & (rest.entropy_a < math.log(256))).all()
    assert (rest.kl_ab >= 0).all() and (rest.kl_ba >= 0).all()  # kl_ba is inf: see below
    assert ((rest.jsd >= 0) & (rest.jsd <= math.log(2))).all()
    # SmolLM2 has no token starting with 21 of the bytes (0xC0, 0xF5..0xFF...): P = 0 there
    assert (rest.kl_ab < math.inf).all() and (rest.kl_ba == math.inf).all()
    for lm in (smollm2, gemma3):
        vocab = bl.byte_vocab(lm.tokenizer, lm.model.get_output_embeddings().weight.shape[0])
        start = bl.encode_bytes(lm.tokenizer, vocab, b"The")
        lp = bl.next_byte_logprobs(lm.model, lm.tokenizer, b" quick brown ", start_ids=start,
                                   vocab=vocab)
        assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
        raw = bl.next_byte_logprobs(lm.model, lm.tokenizer, b" quick brown ", start_ids=start,
                                    normalize=False, vocab=vocab)
        assert 0.99 < float(raw.exp().sum()) <= 1.0 + 1e-9


def extension_mass(logp: torch.Tensor, pieces: list, token: int) -> float:
    """log(1 + eps), eps = P(other tokens whose bytes start with `token`'s) / P(token)."""
    others = [i for i, p in enumerate(pieces[:len(logp)])
              if p is not None and i != token and p.startswith(pieces[token])]
    return math.log1p(float(logp[others].exp().sum() / logp[token].exp()))


def canonical_reference(lm, start: list[int], covers: list[tuple[int, ...]]) -> dict:
    """log P(t | start) of each cover from one plain forward per distinct left part."""
    out = {}
    for left in {t[:-1] for t in covers}:
        logp = token_logprobs(lm, start + list(left))
        head = sum(float(logp[len(start) - 1 + j, left[j]]) for j in range(len(left)))
        out |= {t: head + float(logp[-1, t[-1]]) for t in covers if t[:-1] == left}
    return out


@pytest.mark.embedded
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_embedded_word_logprob_agrees_with_the_token_logprob(fixture, request):
    """At each space of the sentence (an exact token boundary in both tokenizers), the byte
    method's log P(prefix) and log P(' word' | prefix) against the model's token log-probs.

    Let ids[:k] be the prefix's canonical encoding. Its covers are (a) ids[:k-1] with a last
    token extending ids[k-1]'s bytes (' fox', ' foxes'): mass P(ids[:k]) (1 + eps), eps from
    the token distribution alone; (b) splits inside the last word that are not the tokenizer's
    encodings (almost no mass: pruned by the authors' rule, kept by the default); (c)
    canonical encodings of longer words that re-split the last one (SmolLM2 reads 'The
    quicks...' as ' qu' 'icks': 0.23 nats). So log P_byte >= token log-prob + log(1 + eps),
    the authors' variant equals the plain-forward sum over its covers, and a word's
    conditional equals the token one plus log(1 + eps_word) - log(1 + eps_previous) up to (b),
    bounded by 0.01 nats (measured: under 1e-3), wherever (c) is under 1e-3 nats."""
    lm = request.getfixturevalue(fixture)
    tok, data = lm.tokenizer, SENTENCE.encode()
    vocab = bl.byte_vocab(tok, lm.model.get_output_embeddings().weight.shape[0])
    skip = 0 if bl.leading_ids(tok) else data.index(b" ")  # SmolLM2: condition on 'The'
    start = bl.leading_ids(tok) or list(bl.encode_bytes(tok, vocab, data[:skip]))
    ids = list(bl.encode_bytes(tok, vocab, data[skip:]))
    logp = token_logprobs(lm, start + ids)  # (T, V)
    ends = [0] + list(itertools.accumulate(len(vocab.pieces[i]) for i in ids))  # token ends
    prev, compared = None, 0
    for n in [n for n in range(skip + 1, len(data)) if data[n] == 32] + [len(data) - 1]:
        k = ends.index(n - skip)  # exact boundary: the prefix's encoding is ids[:k]
        assert bl.encode_bytes(tok, vocab, data[skip:n]) == tuple(ids[:k])
        byte_lp = bl.prefix_logprob(lm.model, tok, data[skip:n], start_ids=start, vocab=vocab)
        positions = len(start) - 1 + torch.arange(k)
        token_lp = float(logp[positions, torch.tensor(ids[:k], dtype=torch.long)].sum())
        ext = extension_mass(logp[len(start) + k - 2], vocab.pieces, ids[k - 1])
        # fp32 forwards of different shapes differ by ~5e-7 relative (below): ~1.5e-5 on ~30
        # nats (1.0e-5 measured on one host; 4e-6 on another)
        assert byte_lp >= token_lp + ext - 5e-5, n
        covers = bl.cover_encodings(data[skip:n], tok, prune="canonical", vocab=vocab)
        ref = canonical_reference(lm, start, covers)
        canonical = bl.prefix_logprob(lm.model, tok, data[skip:n], prune="canonical",
                                      start_ids=start, vocab=vocab)
        # the same covers; fp32 forwards, batched and padded or not, differ by ~5e-7 relative
        assert canonical == pytest.approx(math.log(sum(map(math.exp, ref.values()))), abs=1e-4)
        assert byte_lp >= canonical - 1e-9  # the default keeps every canonical cover
        resplit = math.log1p(sum(math.exp(v - token_lp) for t, v in ref.items()
                                 if len(t) != k or t[:-1] != tuple(ids[:k - 1])) / (1 + ext))
        if prev is None:
            word_bytes, word_tokens, prev_ext, prev_resplit = byte_lp, token_lp, 0.0, 0.0
        else:
            word_bytes, word_tokens = byte_lp - prev[0], token_lp - prev[1]
            prev_ext, prev_resplit = prev[2], prev[3]
        if max(resplit, prev_resplit) < 1e-3:
            assert word_bytes - word_tokens == pytest.approx(ext - prev_ext, abs=0.01), n
            compared += 1
        prev = (byte_lp, token_lp, ext, resplit)
    assert compared >= 6
