"""The probe contract: a probe is one file (here: this test file), and the runner, the CLI, the
run store, `tokenprobe query` and the dashboard's generic views take it from its declarations;
no probe keeps an activation-sized tensor past its hook."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

import tokenprobe
from tokenprobe.analyses import views
from tokenprobe.app import runs
from tokenprobe.cli.main import main
from tokenprobe.probe import Option, Probe, register, registry, unregister
from tokenprobe.probes import EntropyConfig, EntropyProbe
from tokenprobe.tables import TABLES, Column, Table

DASHBOARD = str(Path(runs.__file__).with_name("dashboard.py"))


@dataclass(frozen=True)
class L1Config:
    """Settings of the test's L1 probe.

    Attributes:
        scale: factor on every L1 norm.
        every: keep one layer in `every` in the per-layer table.
    """

    scale: float = 1.0
    every: int = 1


class L1Probe(Probe):
    """Per token the L1 norm of the last block's residual (column of `tokens`) and per layer
    its mean over the prompt (a table of its own)."""

    name = "l1norm"
    sites = ("resid_post",)
    Config = L1Config
    tables = {
        "tokens": {"l1_last": Column("float64", "scale x sum_d |h_L[t, d]|")},
        "l1_layers": Table("prompt x layer", ("prompt_id", "layer"), {
            "prompt_id": Column("int64", "key"), "layer": Column("int64", "key"),
            "l1_mean": Column("float64", "mean over tokens of scale x sum_d |h_l[t, d]|")}),
    }

    def begin(self, batch):
        super().begin(batch)
        self.rows, self.last = [], []

    def observe(self, site, layer, h):
        norms = h.float().abs().sum(-1) * self.config.scale  # (B, T): reduced in the hook
        for row, prompt_id, n in self.batch.rows():
            if layer % self.config.every == 0:
                self.rows.append((prompt_id, layer, float(norms[row, :n].mean())))
            if layer == self.batch.n_layers - 1:
                self.last.append(pd.DataFrame({"prompt_id": prompt_id, "pos": np.arange(n),
                                               "l1_last": norms[row, :n].numpy()}))

    def collect(self):
        out = {"l1_layers": pd.DataFrame(self.rows, columns=["prompt_id", "layer", "l1_mean"]),
               "tokens": pd.concat(self.last, ignore_index=True)}
        self.begin(self.batch)
        return out


@pytest.fixture
def l1_probe():
    register(L1Probe)
    yield L1Probe
    unregister("l1norm")


def reference_l1(loaded, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean and last-layer per-token L1 norms from plain forward hooks."""
    outs = []
    handles = [block.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(
        o, tuple) else o)) for block in loaded.model.model.layers]
    try:
        with torch.no_grad():
            loaded.model(**loaded.tokenizer(text, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    l1 = torch.stack([o[0].abs().sum(-1) for o in outs]).numpy()  # (L, T)
    return l1.mean(1), l1[-1]


def test_new_probe_in_one_file_runs_through_cli_store_query_and_dashboard(
        l1_probe, tiny_llama, tmp_path, capsys, monkeypatch):
    assert "l1norm" in registry() and "l1_layers" in TABLES
    text = "the cat sat on the mat"
    out = tmp_path / "runs" / "l1"
    code = main(["run", "--model", "tiny-llama", "--probes", "l1norm", "--l1norm-scale", "2",
                 "--prompt", text, "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = tokenprobe.open_run(out)
    means, last = reference_l1(tiny_llama, text)
    np.testing.assert_allclose(run.l1_layers.l1_mean, 2 * means, rtol=1e-5)
    np.testing.assert_allclose(run.tokens.l1_last, 2 * last, rtol=1e-5)
    assert run.meta["probes"] == [{"name": "l1norm", "scale": 2.0, "every": 1}]
    assert list(run.l1_layers.columns) == ["prompt_id", "layer", "l1_mean"]

    capsys.readouterr()
    assert main(["query", "SELECT layer, l1_mean FROM l1_layers ORDER BY layer DESC LIMIT 1",
                 str(out), "--format", "csv"]) == 0
    got = capsys.readouterr().out.splitlines()
    assert got[0] == "layer,l1_mean" and float(got[1].split(",")[1]) == pytest.approx(
        2 * means[-1], rel=1e-5)

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    assert "--l1norm-scale" in help_text and "factor on every L1 norm" in help_text

    # the dashboard's generic views: the token metric, the table list and the live-run options
    assert "l1_last" in views.available_metrics(run)
    frame = views.token_metric_frame(run, 0, "l1_last")
    np.testing.assert_allclose(frame.value, 2 * last, rtol=1e-5)
    assert "scale x sum_d" in views.metric_spec("l1_last").label
    monkeypatch.setenv(runs.ROOT_ENV, str(tmp_path / "runs"))
    at = AppTest.from_file(DASHBOARD, default_timeout=60)
    at.query_params.update(run="l1")
    at.run()
    assert not at.exception
    assert "l1_last: scale x sum_d |h_L[t, d]|" in at.selectbox(key="run-metric").options
    assert any(e.label.startswith("l1_layers ") for e in at.expander)
    at = AppTest.from_file(DASHBOARD, default_timeout=60)
    at.query_params.update(page="Live run")
    at.run()
    at.multiselect(key="form-probes").set_value(["l1norm"]).run()
    assert at.number_input(key="form-l1norm-scale").value == 1.0


def test_probe_options_come_from_the_config():
    by_name = {o.name: o for o in EntropyProbe.options()}
    assert [f.name for f in dataclasses.fields(EntropyConfig)] == list(by_name)[:-1]
    assert by_name["lens"] == Option("lens", bool, False, by_name["lens"].help,
                                     aliases=("--lens",))
    assert "logit lens" in by_name["lens"].help
    assert by_name["contrast_beta"].optional and by_name["contrast_beta"].type is float
    assert by_name["quantiles_over"].choices == ("run", "prompt")
    assert by_name["compare"].type == "model"
    sinks = {o.name: o for o in registry()["sinks"].options()}
    assert {"eps", "cos_threshold", "primary_margin"} <= set(sinks)
    assert sinks["candidates"].parse("0,1,2") == (0, 1, 2)
    with pytest.raises(ValueError, match="one of"):
        by_name["window_from"].parse("middle")


def test_sinks_thresholds_are_cli_options(tiny_llama, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--model", "tiny-llama", "--probes", "sinks", "--sinks-eps", "0.05",
                 "--sinks-primary-margin", "1", "--prompt", "the cat sat on the mat", "--out",
                 str(out), "--quiet"]) == 0
    run = tokenprobe.open_run(out)
    assert run.meta["probes"][0]["eps"] == 0.05 and run.meta["summary"]["sinks"]["eps"] == 0.05
    assert run.meta["probes"][0]["primary_margin"] == 1


def activation_sized(obj, limit: int, seen=None) -> int:
    """How many tensors or arrays of at least `limit` elements `obj` holds (recursively)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return int(obj.size if isinstance(obj, np.ndarray) else obj.numel()) >= limit
    if isinstance(obj, dict):
        return sum(activation_sized(v, limit, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(activation_sized(v, limit, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(activation_sized(v, limit, seen) for k, v in vars(obj).items()
                   if k not in ("batch", "unembed", "cmp_unembed", "compare"))
    return 0


def test_no_probe_keeps_activations_past_its_hook(tiny_llama):
    """After every hook, what each probe holds is per token, head or entry: never a tensor of
    (scored tokens x d_model) or more; the logit lens holds one, the final residual it compares each
    layer with, and only during its second pass."""
    texts = ["the cat sat on the mat and the dog sat on the rug", "hello there"]
    probes = [tokenprobe.probes.ActivationsProbe(), tokenprobe.probes.SinksProbe(),
              EntropyProbe(EntropyConfig(lens=True))]
    d_model = tiny_llama.model.config.hidden_size
    held: dict[str, list[tuple[int, int]]] = {p.name: [] for p in probes}
    for probe in probes:
        observe, passes = probe.observe, []
        original_pass = probe.begin_pass

        def begin_pass(index, probe=probe, original_pass=original_pass, passes=passes):
            passes.append(index)
            original_pass(index)

        def watched(site, layer, tensor, probe=probe, observe=observe, passes=passes):
            observe(site, layer, tensor)
            scored = sum(probe.batch.lengths) - len(probe.batch.lengths)  # tokens predicting
            held[probe.name].append((passes[-1], activation_sized(probe, scored * d_model)))

        probe.observe, probe.begin_pass = watched, begin_pass
    run = tokenprobe.run(tiny_llama, texts, probes, progress=False)
    assert "lens_entropy" in run.token_layers
    assert all(n == 0 for _, n in held["activations"] + held["sinks"])
    n_layers = tiny_llama.model.config.num_hidden_layers
    lens = held["entropy"]
    assert len(lens) == 2 * n_layers  # two passes over every block
    assert [n for p, n in lens if p == 0][:-1] == [0] * (n_layers - 1)
    assert max(n for _, n in lens) == 1 and lens[-1][1] == 0  # dropped after the last layer


def test_tables_built_per_batch_equal_those_of_single_prompts(tiny_llama):
    """The probes build each table once per batch from padded (L, B, T) buffers: a batch of
    prompts of different lengths gives the rows of running them one at a time."""
    import pandas as pd

    prompts = ["a", "The cat sat on the mat.", "Hi there\n\tfriend! " * 4, "x y z"]
    from tokenprobe.probes import ActivationsConfig, ActivationsProbe

    probes = [ActivationsProbe(ActivationsConfig(abs_threshold=1.0, median_ratio=3.0)),
              "sinks", "entropy"]  # thresholds low enough for the tiny model's massive rows
    batched, single = (tokenprobe.run(tiny_llama, prompts, probes, batch_size=b,
                                      progress=False) for b in (3, 1))
    assert set(batched.tables) == set(single.tables)
    for name in batched.tables:
        a, b = batched.tables[name], single.tables[name]
        assert len(a) == len(b) and len(a) or name == "nonfinite", name
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5, obj=name)
