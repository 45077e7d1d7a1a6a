"""KV-shared sampler: inverse-CDF draws, and the same tokens as a full re-encode per step."""
from __future__ import annotations

import pytest
import torch

from tokenprobe.analyses.critical.sampling import (Job, draw, sample_continuations, sample_jobs,
                                                   sample_reference)
from tokenprobe.models import eos_ids


def test_draw_follows_the_distribution_and_bans():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    probs = torch.softmax(logits.double(), -1)[0]
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # stratified uniforms
    ids = draw(logits.expand(len(grid), -1), grid, temperature=1.0)
    freq = torch.bincount(ids, minlength=4).double() / len(grid)
    torch.testing.assert_close(freq, probs, atol=1e-3, rtol=0)
    banned = draw(logits.expand(len(grid), -1), grid, temperature=1.0, ban=3)
    assert not (banned == 3).any()
    rest = probs.clone()
    rest[3] = 0
    freq = torch.bincount(banned, minlength=4).double() / len(grid)
    torch.testing.assert_close(freq, rest / rest.sum(), atol=1e-3, rtol=0)
    cold = draw(logits.expand(len(grid), -1), grid, temperature=0.25)
    hot = torch.softmax(logits.double() / 0.25, -1)[0]
    torch.testing.assert_close(torch.bincount(cold, minlength=4).double() / len(grid), hot,
                               atol=1e-3, rtol=0)
    assert draw(logits, torch.tensor([0.3]), temperature=0).item() == 3


def _stop(ids: list[int]) -> bool:  # ends rows at different steps, so rows leave the cache
    return len(ids) >= 3 + ids[0] % 6


@pytest.mark.parametrize("ban_first", [None, 104])
def test_kv_shared_sampler_equals_full_reencode(tiny_llama, ban_first):
    prefix = tiny_llama.tokenizer("Hello wor")["input_ids"]
    seeds = [11, 5, 902, 3, 77, 1234567890123]
    eos = eos_ids(tiny_llama.model, tiny_llama.tokenizer)
    got = sample_continuations(tiny_llama.model, prefix, seeds, temperature=1.0,
                               max_new_tokens=10, eos_ids=eos, stop=_stop, ban_first=ban_first,
                               batch_size=4)
    for seed, cont in zip(seeds, got):
        ref = sample_reference(tiny_llama.model, prefix, seed, temperature=1.0,
                               max_new_tokens=10, eos_ids=eos, stop=_stop, ban_first=ban_first)
        assert cont == ref
        if ban_first is not None:
            assert cont.ids[0] != ban_first
    assert len({tuple(c.ids) for c in got}) > 1
    assert {c.finish for c in got} <= {"stop", "eos", "length"}


def test_continuations_do_not_depend_on_the_batch(tiny_llama):
    prefix = tiny_llama.tokenizer("abc")["input_ids"]
    kwargs = {"temperature": 0.5, "max_new_tokens": 8, "stop": _stop}
    one = sample_continuations(tiny_llama.model, prefix, [1, 2, 3, 4, 5], batch_size=1, **kwargs)
    five = sample_continuations(tiny_llama.model, prefix, [1, 2, 3, 4, 5], batch_size=5, **kwargs)
    assert one == five
    again = sample_continuations(tiny_llama.model, prefix, [3], batch_size=3, **kwargs)
    assert again[0] == five[2]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_mixed_prefix_batches_equal_full_reencode(request, model):
    """Rows of nested prefixes (one shared forward, masked holes) and of an unrelated prefix
    decoded in mixed batches; tiny-gemma3 has sliding-window layers and takes the
    one-prefix-per-batch path."""
    loaded = request.getfixturevalue(model)
    text = loaded.tokenizer("Hello world, once more")["input_ids"]
    other = loaded.tokenizer("abc")["input_ids"]
    jobs = [Job(text[:4], [1, 2, 3], stop=_stop), Job(text, [4, 5]),
            Job(text[:9], [6, 7, 8], ban_first=text[9]), Job(other, [9, 10], stop=_stop),
            Job(text[:4], [11])]
    got = sample_jobs(loaded.model, jobs, temperature=1.0, max_new_tokens=7, batch_size=4)
    assert [len(conts) for conts in got] == [3, 2, 3, 2, 1]
    for job, conts in zip(jobs, got):
        for seed, cont in zip(job.seeds, conts):
            assert cont == sample_reference(loaded.model, job.prefix, seed, temperature=1.0,
                                            max_new_tokens=7, stop=job.stop,
                                            ban_first=job.ban_first)
    alone = sample_continuations(loaded.model, text[:9], [6, 7, 8], temperature=1.0,
                                 max_new_tokens=7, ban_first=text[9], batch_size=1)
    assert alone == got[2]
    assert len({tuple(c.ids) for conts in got for c in conts}) > 5


def test_empty_prefix_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="non-empty prefix"):
        sample_continuations(tiny_llama.model, [], [0], temperature=1.0, max_new_tokens=2)


@pytest.mark.embedded
def test_kv_shared_sampler_on_smollm2(smollm2):
    prefix = smollm2.tokenizer("Tom has 27 marbles and gets 15 more, so he has")["input_ids"]
    got = sample_continuations(smollm2.model, prefix, [0, 1], temperature=0.7, max_new_tokens=8)
    for seed, cont in zip([0, 1], got):
        assert cont == sample_reference(smollm2.model, prefix, seed, temperature=0.7,
                                        max_new_tokens=8)
