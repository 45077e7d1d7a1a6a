"""kernels/selfcheck.py: first-use self-checks of the fast paths, and `tokenprobe selftest`.

The fast paths run here in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and
as the CPU "flash" path; a broken one is made by wrapping the op's internal launcher."""
from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest
import torch

import tokenprobe
from tokenprobe.cli.args import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tokenprobe.cli.main import main
from tokenprobe.kernels import attention, cases, linear_entropy as le, selfcheck, two_model
from tokenprobe.kernels.attention import attention_with_stats
from tokenprobe.kernels.linear_entropy import linear_entropy
from tokenprobe.kernels.selfcheck import SelfCheckWarning
from tokenprobe.kernels.two_model import two_model_divergence
from tokenprobe.probes import EntropyConfig, EntropyProbe

PROMPTS = ["The cat sat on the mat.", "Hi!"]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test starts with nothing trusted, nothing recorded and the check on."""
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


def broken(monkeypatch, module, name, spoil):
    """Replace module.name by a wrapper whose result `spoil` changes; returns its call count."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return spoil(real(*args, **kwargs))

    monkeypatch.setattr(module, name, wrapper)
    return calls


def plus_one(key):
    def spoil(out):
        out[key] = out[key] + 1
        return out
    return spoil


def attention_plus_one(result):
    out, stats = result
    return out, {**stats, "attn_entropy": stats["attn_entropy"] + 1}


def two_model_plus_one(acc):
    acc = acc.clone()
    acc[two_model.U_P] += 1  # entropy_p off
    return acc


def entropy_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)


def attention_inputs():
    return cases.attention_inputs(2, 1, 9, 8, torch.float32, [9, 6], "cpu")


def call_entropy(impl):
    h, w = entropy_inputs()
    return linear_entropy(h, w, impl=impl)


def call_two_model(impl):
    h, w = entropy_inputs()
    return two_model_divergence(h, w, h.flip(0), w.flip(0), impl=impl)


def call_attention(impl):
    q, k, v, mask, lengths = attention_inputs()
    return attention_with_stats(q, k, v, mask, lengths, scaling=0.3, impl=impl)


def same(a, b):
    if isinstance(a, tuple):
        return same(a[0], b[0]) and same(a[1], b[1])
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a.nan_to_num(0), b.nan_to_num(0))


BREAKS = {  # (op, asked impl, the fast impl, module, launcher, spoil, call)
    "linear_entropy": ("linear_entropy", "triton", "triton", le, "_triton", plus_one("entropy"),
                       call_entropy, "entropy"),
    "two_model": ("two_model_divergence", "triton", "triton", two_model, "_triton",
                  two_model_plus_one, call_two_model, "entropy_p"),
    "attention_triton": ("attention_with_stats", "triton", "triton", attention, "_triton",
                         attention_plus_one, call_attention, "attn_entropy"),
    "attention_flash": ("attention_with_stats", "auto", "flash", attention, "_flash",
                        attention_plus_one, call_attention, "attn_entropy"),  # CPU's default
}


@pytest.mark.parametrize("which", list(BREAKS))
def test_a_broken_fast_path_is_caught_and_torch_runs_for_the_rest_of_the_process(
        which, monkeypatch):
    op, asked, fast, module, launcher, spoil, call, output = BREAKS[which]
    monkeypatch.setattr(attention, "FLASH_FROM", 0)  # "auto" on CPU: flash past FLASH_FROM tokens
    calls = broken(monkeypatch, module, launcher, spoil)
    want = call("torch")
    with pytest.warns(SelfCheckWarning, match=rf"^self-check of {op} impl='{fast}' failed on "
                                              rf"cpu: {output} differs from impl='torch' by "):
        first = call(asked)
    checked = len(calls)
    assert checked >= 1 and same(first, want)  # the check ran the kernel; the op ran torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        assert same(call(asked), want)
    assert len(calls) == checked  # not checked again, not run again
    record = selfcheck.ran()[op]
    assert record["impl"] == "torch" and record["checked"] is True
    assert record["passed"] is False and record["error"].startswith(f"{output} differs")


def test_the_suite_makes_a_failed_check_an_error(monkeypatch):
    """pyproject's filterwarnings: a kernel test whose fast path fails its check fails."""
    broken(monkeypatch, le, "_triton", plus_one("entropy"))
    with pytest.raises(SelfCheckWarning):
        call_entropy("triton")


def test_a_kernel_that_raises_is_a_failed_check(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no such\nlaunch")

    monkeypatch.setattr(le, "_triton", boom)
    with pytest.warns(SelfCheckWarning, match="on cpu: RuntimeError: no such launch; using "
                                              "impl='torch'"):
        assert same(call_entropy("triton"), call_entropy("torch"))


def test_a_run_forced_to_a_broken_triton_gives_the_torch_run(tiny_llama, monkeypatch):
    broken(monkeypatch, le, "_triton", plus_one("entropy"))
    plain = tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(EntropyConfig(impl="torch"))],
                           progress=False)
    with pytest.warns(SelfCheckWarning, match="linear_entropy impl='triton' failed on cpu"):
        forced = tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(EntropyConfig(impl="triton"))],
                                progress=False)
    assert plain.tables.keys() == forced.tables.keys()
    for name in plain.tables:
        pd.testing.assert_frame_equal(plain.tables[name], forced.tables[name])
    assert plain.meta["kernels"] == {"linear_entropy": {
        "impl": "torch", "checked": False, "passed": None, "error": None}}
    ran = forced.meta["kernels"]["linear_entropy"]
    assert (ran["impl"], ran["checked"], ran["passed"]) == ("torch", True, False)
    assert ran["error"].startswith("entropy differs from impl='torch'")


def test_a_passing_check_is_recorded_and_cached(monkeypatch):
    checks = []
    real = selfcheck._check
    monkeypatch.setattr(selfcheck, "_check", lambda *a: checks.append(a) or real(*a))
    kernel = broken(monkeypatch, le, "_triton", lambda out: out)
    for _ in range(3):
        torch.testing.assert_close(call_entropy("triton")["entropy"],
                                   call_entropy("torch")["entropy"])
    assert checks == [("linear_entropy", "triton", torch.device("cpu"))]
    assert len(kernel) == 1 + 3  # once for the check, then each call
    assert selfcheck.ran() == {"linear_entropy": {"impl": "triton+torch", "checked": True,
                                                  "passed": True, "error": None}}
    selfcheck.reset_ran()
    call_entropy("triton")
    assert selfcheck.ran()["linear_entropy"] == {"impl": "triton", "checked": True,
                                                 "passed": True, "error": None}
    assert len(checks) == 1  # the trust outlives the record
    state = torch.get_rng_state()
    monkeypatch.setattr(attention, "FLASH_FROM", 0)
    call_attention("auto")  # the flash check: its own generator, never the global one
    assert selfcheck.ran()["attention_with_stats"]["checked"]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("flash_from", [None, 0])
def test_a_run_records_what_each_op_ran(tiny_llama, flash_from, monkeypatch):
    if flash_from is not None:  # "auto" on CPU: flash past FLASH_FROM tokens, torch up to it
        monkeypatch.setattr(attention, "FLASH_FROM", flash_from)
    call_attention("torch")  # before the run: not in its record
    call_two_model("torch")
    run = tokenprobe.run(tiny_llama, PROMPTS, ["sinks", EntropyProbe(EntropyConfig(impl="triton",
                                                                                  lens=True))],
                         progress=False)
    ok = {"checked": True, "passed": True, "error": None}
    attended = ({"impl": "flash", **ok} if flash_from == 0 else
                {"impl": "torch", "checked": False, "passed": None, "error": None})
    assert run.meta["kernels"] == {"attention_with_stats": attended,
                                   "linear_entropy": {"impl": "triton", **ok},
                                   "two_model_divergence": {"impl": "triton", **ok}}


@pytest.mark.parametrize("switch", ["env", "function"])
def test_the_check_can_be_switched_off(switch, monkeypatch):
    broken(monkeypatch, le, "_triton", plus_one("entropy"))
    if switch == "env":
        monkeypatch.setenv("TOKENPROBE_SELFCHECK", "0")
    else:
        selfcheck.set_enabled(False)
    assert not selfcheck.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = call_entropy("triton")
    torch.testing.assert_close(got["entropy"], call_entropy("torch")["entropy"] + 1)  # unchecked
    assert selfcheck.ran()["linear_entropy"] == {"impl": "triton+torch", "checked": False,
                                                 "passed": None, "error": None}


def cli_run(tmp_path, *extra):
    out = tmp_path / "r"
    code = main(["run", "--model", "tiny-llama", "--prompt", "abc", "--out", str(out), "--quiet",
                 "--overwrite", *extra])
    return code, (json.loads((out / "run.json").read_text()) if code == EXIT_OK else None)


def test_cli_no_selfcheck_and_impl(tmp_path, monkeypatch, capsys):
    broken(monkeypatch, le, "_triton", plus_one("entropy"))
    code, meta = cli_run(tmp_path, "--probes", "entropy", "--impl", "triton", "--no-selfcheck")
    assert code == EXIT_OK and not selfcheck.enabled()
    assert meta["probes"][0]["impl"] == "triton"
    assert meta["kernels"]["linear_entropy"] == {"impl": "triton", "checked": False,
                                                 "passed": None, "error": None}
    selfcheck.reset()
    with pytest.warns(SelfCheckWarning, match="linear_entropy impl='triton' failed"):
        code, meta = cli_run(tmp_path, "--probes", "sinks,entropy", "--impl", "triton",
                             "--sinks-impl", "torch")  # the probe's own option wins
    assert code == EXIT_OK
    assert [p["impl"] for p in meta["probes"]] == ["torch", "triton"]
    assert meta["kernels"]["linear_entropy"]["passed"] is False  # a forced impl is checked too
    assert meta["kernels"]["attention_with_stats"]["impl"] == "torch"
    for extra, message in [(("--impl", "flash"), "--impl flash is not an implementation of "
                                                 "the entropy probe"),
                           (("--probes", "activations", "--impl", "torch"),
                            "none of activations has one")]:
        capsys.readouterr()
        assert cli_run(tmp_path, *extra)[0] == EXIT_USAGE
        assert message in capsys.readouterr().err


def test_the_cli_prints_the_warning_on_one_line(monkeypatch):
    from tokenprobe.cli.run import one_line_selfcheck_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    one_line_selfcheck_warnings()
    one_line_selfcheck_warnings()  # once is enough
    text = warnings.formatwarning(SelfCheckWarning("self-check of x failed"), SelfCheckWarning,
                                  "f.py", 1)
    assert text == "tokenprobe: warning: self-check of x failed\n"
    assert "UserWarning" in warnings.formatwarning(UserWarning("u"), UserWarning, "f.py", 1)


def test_selftest_passes_here_and_prints_the_table(capsys):
    assert main(["selftest", "--device", "cpu", "--repeats", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("tokenprobe selftest on cpu: torch ")
    assert "TRITON_INTERPRET=1" in lines[0]
    assert lines[1].split() == ["op", "case", "impl", "dtype", "worst", "err", "tol", "time/call",
                                "x", "torch", "result"]
    seen = {(line.split()[0], impl) for line in lines[2:-1]
            for impl in ("torch", "flash", "triton") if f"  {impl}  " in line}
    assert seen == {("attention_with_stats", "torch"), ("attention_with_stats", "flash"),
                    ("attention_with_stats", "triton"), ("linear_entropy", "torch"),
                    ("linear_entropy", "triton"), ("two_model_divergence", "torch"),
                    ("two_model_divergence", "triton")}
    assert out.count("skipped (impl='flash' needs") == 2  # the softcapped cases, one per model
    assert lines[-1] == "22 ok, 0 failed, 2 skipped"
    assert selfcheck.ran() == {}  # the selftest neither checks nor records


def test_selftest_fails_naming_the_op(monkeypatch, capsys):
    broken(monkeypatch, le, "_triton", plus_one("entropy"))
    code = main(["selftest", "--device", "cpu", "--repeats", "0", "--op", "linear_entropy"])
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert out.count("FAIL (worst: entropy)") == 2 and out.splitlines()[-1] == \
        "2 ok, 2 failed, 0 skipped"
    assert err.count("tokenprobe: selftest: linear_entropy impl=triton float32 on ") == 2


def test_selftest_skips_triton_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    rows = list(selfcheck.selftest("cpu", repeats=0, ops=("linear_entropy",)))
    assert [(r.impl, r.status) for r in rows] == [("torch", "ok"), ("triton", "skipped")] * 2
    assert "TRITON_INTERPRET=1" in rows[1].note


def test_rank_and_ids_errors_allow_near_ties_and_nothing_else():
    logits = torch.tensor([[3.0, 1.0, 1.0 + 1e-7, -2.0]], dtype=torch.float64)
    targets = torch.tensor([1])
    assert cases.rank_error(torch.tensor([3]), targets, logits) == 0  # exact
    assert cases.rank_error(torch.tensor([2]), targets, logits) < 1e-7  # across a near-tie
    assert cases.rank_error(torch.tensor([1]), targets, logits) == pytest.approx(1.0)
    assert cases.rank_error(torch.tensor([5]), targets, logits) == math.inf
    assert cases.rank_error(torch.tensor([2]), torch.tensor([-1]), logits) == math.inf
    assert cases.rank_error(torch.tensor([0]), torch.tensor([-100]), logits) == 0
    assert cases.ids_error(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]), logits) < 1e-7
    assert cases.ids_error(torch.tensor([[0, 3]]), torch.tensor([[0, 2]]), logits) > 0.5
    assert cases.ids_error(torch.tensor([[0, 0]]), torch.tensor([[0, 2]]), logits) == math.inf
    assert cases.max_error(torch.tensor([1.0, math.nan]), torch.tensor([1.0, 1.0])) == math.inf
    assert cases.max_error(torch.tensor([3.0]), torch.tensor([1.0])) == 1.0  # 2 / (1 + 1)


@pytest.mark.embedded
def test_the_model_shapes_are_the_embedded_models(smollm2, gemma3):
    """Against the cached configs (the fixtures build both caches: an uncached Gemma GGUF
    gives describe() no facts)."""
    from tokenprobe.models import describe

    for name, shape in cases.MODELS.items():
        facts = describe(name)
        assert (shape.heads, shape.kv_heads, shape.width, shape.vocab) == (
            facts["heads"], facts["kv_heads"], facts["width"], facts["vocab"]), name
