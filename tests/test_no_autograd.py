"""Measurement code builds no autograd graph, whatever the caller's weights require.

The guard is a count of the tensors autograd saves for backward (`saved_tensors_hooks`): a
kernel tile kept for a graph is one, and a streaming kernel that keeps them is not streaming
(the logit lens once held about 45 MB per token this way).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenprobe
from tokenprobe.attention import zero_tuning
from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.two_model import two_model_divergence
from tokenprobe.probes import EntropyConfig, EntropyProbe


@contextlib.contextmanager
def saved_for_backward():
    """Yields a list that collects the shape of every tensor autograd saves inside the block."""
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _no_graph(out: dict[str, torch.Tensor]) -> None:
    for name, value in out.items():
        assert not value.requires_grad and value.grad_fn is None, name


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_linear_entropy_with_a_grad_weight_builds_no_graph(impl):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=g)
    weight = torch.randn(301, 24, generator=g).requires_grad_(True)
    bias = torch.randn(301, generator=g).requires_grad_(True)
    targets = torch.randint(0, 301, (37,), generator=g)
    with saved_for_backward() as saved:
        out = linear_entropy(hidden, weight, bias=bias, targets=targets, impl=impl,
                             token_chunk=16, vocab_chunk=64)
    assert saved == []
    _no_graph(out)
    expected = linear_entropy(hidden, weight.detach(), bias=bias.detach(), targets=targets,
                              impl=impl, token_chunk=16, vocab_chunk=64)
    for name in out:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_two_model_divergence_with_grad_weights_builds_no_graph(impl):
    g = torch.Generator().manual_seed(1)
    hp, hq = torch.randn(29, 16, generator=g), torch.randn(29, 20, generator=g)
    wp = torch.randn(211, 16, generator=g).requires_grad_(True)
    wq = torch.randn(211, 20, generator=g).requires_grad_(True)
    targets = torch.randint(0, 211, (29,), generator=g)
    with saved_for_backward() as saved:
        out = two_model_divergence(hp, wp, hq, wq, targets=targets, contrast_beta=1.0,
                                   impl=impl, token_chunk=8, vocab_chunk=64)
        lens = two_model_divergence(hp, wp, hp * 2, wp, jsd=False, impl=impl, token_chunk=8,
                                    vocab_chunk=64)  # the shared-weight (logit lens) path
    assert saved == []
    _no_graph(out)
    _no_graph(lens)


@pytest.mark.parametrize("impl", ["torch", "flash", "triton", "reference"])
def test_attention_with_stats_builds_no_graph(impl):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 33, 16, generator=g).requires_grad_(True)
    k, v = (torch.randn(2, 2, 33, 16, generator=g).requires_grad_(True) for _ in range(2))
    lengths = torch.tensor([33, 20])
    with saved_for_backward() as saved:
        out, stats = attention_with_stats(q, k, v, None, lengths, scaling=0.25, impl=impl)
    assert saved == []
    _no_graph({"out": out, **stats})


def test_zero_tuning_stays_differentiable_when_the_caller_asks_for_gradients(tiny_llama):
    """The kernel builds no graph, so a forward that needs one takes the explicit softmax:
    same logits as the kernel's forward, and gradients reach the input embeddings."""
    model = tiny_llama.model
    ids = torch.tensor([tiny_llama.tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad(), zero_tuning(model, 0.5):
        expected = model(input_ids=ids).logits
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with zero_tuning(model, 0.5):
        logits = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits[0, -1].logsumexp(-1).backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_a_run_with_every_probe_saves_nothing_for_backward(tiny_llama):
    """tokenprobe.run outside any no_grad block, as a user calls it: entropy with the lens and a
    compare model (the kernels on weights that require grad), sinks and activations."""
    assert tiny_llama.model.lm_head.weight.requires_grad
    probes = ["activations", "sinks",
              EntropyProbe(EntropyConfig(lens=True, contrast_beta=1.0), compare=tiny_llama)]
    with saved_for_backward() as saved:
        run = tokenprobe.run(tiny_llama, ["the cat sat on the mat", "a b c"], probes,
                             progress=False)
    assert saved == []
    scored = int((run.prompts.n_tokens - 1).sum())  # every position but the first
    assert run.tokens.entropy.notna().sum() == scored
    assert run.token_layers.lens_entropy.notna().sum() == scored * run.meta["n_layers"]


WORKER = textwrap.dedent("""
    import json, resource, sys
    import tokenprobe
    from tokenprobe.probes import EntropyConfig, EntropyProbe
    lens = sys.argv[1] == "lens"
    model = tokenprobe.load("smollm2-135m")
    text = " ".join(f"word{i % 50}" for i in range(400))
    run = tokenprobe.run(model, [text], [EntropyProbe(EntropyConfig(lens=lens))],
                         max_tokens=256, progress=False)
    assert int(run.prompts.n_tokens[0]) == 256
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def _peak_mb(mode: str, limit_mb: int) -> float:
    """Peak RSS of a fresh process running the entropy probe; killed past `limit_mb` of address
    space (so a regression fails fast instead of swapping the machine)."""
    limit = limit_mb * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, mode], capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 0, f"{mode} run failed (limit {limit_mb} MB):\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.embedded
def test_the_logit_lens_at_256_tokens_costs_a_small_multiple_of_the_plain_probe():
    """At 256 tokens the lens once needed about 11 GB (45 MB per token); now about its inputs."""
    plain = _peak_mb("plain", 16_000)
    lens = _peak_mb("lens", 16_000)
    assert lens < 1.5 * plain, (plain, lens)
