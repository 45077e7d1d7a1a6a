"""Big models across devices: `tokenprobe.load(device_map=...)` through accelerate.

On this CPU-only machine a model is split between CPU and disk offload: the disk blocks (and the
embedding, final norm and tied unembedding) live on `meta` between forwards and are read from
the safetensors cache for their own forward. The run's tables must equal the single-device
run's exactly (`check_exact=True`): the same CPU kernels in the same dtype run on bit-identical
weights (read from the same file), so offloading may change where weights wait between forwards,
never the arithmetic. Without the fixes this fails: inputs sent to `meta` (the embedding's
parameter device), the sinks probe handed a `meta` o_proj weight inside the attention function,
the entropy probe a `meta` lm_head weight outside any forward, the fingerprint unreadable.
"""
from __future__ import annotations

import argparse

import pandas as pd
import pytest
import torch

import tokenprobe
from tokenprobe import models
from tokenprobe.backends import resolve
from tokenprobe.cli.args import (UsageError, add_placement_arguments, add_run_dir_arguments,
                                 placement)
from tokenprobe.models import params_fingerprint
from tokenprobe.placement import PlacementError, placement_meta, preload_offloaded_blocks
from tokenprobe.probes.entropy import EntropyConfig, EntropyProbe

PROMPTS = ["some prompt", "another longer prompt here"]


def cpu_disk_map(loaded) -> dict:
    """Block 0 on CPU, every other block, the embedding, final norm and (tied) lm_head on disk;
    "" (the rest: rotary embeddings) on CPU."""
    n = loaded.model.config.num_hidden_layers
    return {"model.embed_tokens": "disk", "model.layers.0": "cpu",
            **{f"model.layers.{i}": "disk" for i in range(1, n)},
            "model.norm": "disk", "lm_head": "disk", "": "cpu"}


def assert_same_tables(expected, got) -> None:
    assert sorted(got.tables) == sorted(expected.tables)
    for name, frame in expected.tables.items():
        pd.testing.assert_frame_equal(got.tables[name], frame, check_exact=True, obj=name)


@pytest.fixture(params=["tiny-llama", "tiny-gemma3"])
def base(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


def test_cpu_and_disk_offload_give_the_single_device_tables(base, tmp_path):
    split = tokenprobe.load(base.name, device_map=cpu_disk_map(base),
                            offload_folder=tmp_path / "offload")
    model = split.model
    assert model.model.layers[1].self_attn.o_proj.weight.is_meta  # really offloaded
    assert model.lm_head.weight.is_meta and model.model.embed_tokens.weight.is_meta
    assert resolve(split).device == torch.device("cpu")  # not next(parameters()): meta
    assert placement_meta(base.model) == {"device": "cpu"}
    meta = placement_meta(model)
    assert meta["device"] == "cpu"
    assert meta["device_map"]["disk"][:2] == ["model.embed_tokens",
                                              f"model.layers.1-{base.model.config.num_hidden_layers - 1}"]
    assert split.fingerprint == base.fingerprint
    assert_same_tables(tokenprobe.run(base, PROMPTS, out=None, progress=False),
                       tokenprobe.run(split, PROMPTS, out=None, progress=False))
    # The logit lens reads the final norm and lm_head outside any forward, once per layer.
    lens = [EntropyProbe(EntropyConfig(lens=True))]
    assert_same_tables(tokenprobe.run(base, PROMPTS, lens, out=None, progress=False),
                       tokenprobe.run(split, PROMPTS, lens, out=None, progress=False))
    assert model.lm_head.weight.is_meta  # dropped again after the run


def test_an_offloaded_compare_model_gives_the_single_device_divergences(tiny_llama,
                                                                        tiny_gemma3, tmp_path):
    # Same byte vocabulary: tiny-gemma3 is the teacher of tiny-llama (TIP columns).
    split = tokenprobe.load("tiny-gemma3", device_map=cpu_disk_map(tiny_gemma3),
                            offload_folder=tmp_path)
    assert_same_tables(
        tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(compare=tiny_gemma3)], out=None,
                       progress=False),
        tokenprobe.run(tiny_llama, PROMPTS, [EntropyProbe(compare=split)], out=None,
                       progress=False))


def test_auto_with_max_memory_splits_over_cpu_and_disk(tiny_llama, tmp_path):
    # tiny-llama holds 510 kB of float32 weights: 400 kB of CPU keeps the embedding, lm_head
    # and block 0 there and sends blocks 1-2 and the final norm to disk.
    split = tokenprobe.load("tiny-llama", device_map="auto", max_memory={"cpu": "400KB"},
                            offload_folder=tmp_path)
    assert {"cpu", "disk"} <= set(split.model.hf_device_map.values())
    assert_same_tables(tokenprobe.run(tiny_llama, PROMPTS, out=None, progress=False),
                       tokenprobe.run(split, PROMPTS, out=None, progress=False))


def test_cpu_offload_hooks_are_regrouped_per_block(tiny_gemma3):
    # accelerate's offload to CPU for a GPU (here CPU) execution device: the hooks keep the
    # weights in a CPU dict, the modules on meta. What a GPU with "cpu" blocks gets.
    from accelerate import cpu_offload

    offloaded = tokenprobe.load("tiny-gemma3")
    cpu_offload(offloaded.model, execution_device=torch.device("cpu"))
    preload_offloaded_blocks(offloaded.model)
    block = offloaded.model.model.layers[1]
    assert block._hf_hook.place_submodules and block.self_attn.o_proj.weight.is_meta
    assert not hasattr(block.self_attn.o_proj, "_hf_hook")  # one hook for the whole block
    assert_same_tables(tokenprobe.run(tiny_gemma3, PROMPTS, out=None, progress=False),
                       tokenprobe.run(offloaded, PROMPTS, out=None, progress=False))
    assert params_fingerprint(offloaded.model) == params_fingerprint(tiny_gemma3.model)


def test_fingerprint_of_an_offloaded_model_is_the_single_device_one(tiny_gemma3, tmp_path):
    directory = str(models._cache_dir("tiny-gemma3"))  # a path: fingerprinted from the weights
    one = tokenprobe.load(directory)
    split = tokenprobe.load(directory, device_map=cpu_disk_map(tiny_gemma3),
                            offload_folder=tmp_path)
    assert split.fingerprint == one.fingerprint == params_fingerprint(tiny_gemma3.model)
    assert split.fingerprint.startswith("params:")
    assert split.model.model.layers[2].mlp.down_proj.weight.is_meta  # still offloaded after


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cpu", "device_map": "auto"}, "pick one of device"),
    ({"max_memory": {"cpu": "1GiB"}}, "only apply with device_map"),
    ({"offload_folder": "x"}, "only apply with device_map"),
    ({"device_map": "everywhere"}, "is not one of auto"),
    ({"device_map": {}}, "empty dict"),
    ({"device_map": {"": "gpu"}}, "unknown device 'gpu'"),
    ({"device_map": {"": "meta"}}, "holds no weights"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "expected a size"),
    ({"device_map": "auto", "max_memory": {"ram": "1GiB"}}, "GPU index, 'cpu'"),
    ({"device_map": {"": "cpu"}, "max_memory": {"cpu": 10}}, "only applies to a strategy"),
    ({"device_map": {"model.layer.0": "cpu", "": "disk"}}, "did you mean 'model.layers.0'"),
    ({"device_map": {"model.layers": "cpu"}}, "gives no device to lm_head"),
    ({"device_map": {"model.embed_tokens": "cpu", "": "disk"}}, "lm_head.weight is tied"),
])
def test_bad_placements_are_refused_before_the_weights_load(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        tokenprobe.load("tiny-llama", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU this machine lacks")
def test_a_gpu_this_machine_lacks_is_refused():
    with pytest.raises(PlacementError, match=r"device_map\['lm_head'\]: device 'cuda:0'"):
        tokenprobe.load("tiny-llama", device_map={"lm_head": 0, "": "cpu"})
    with pytest.raises(PlacementError, match=r"max_memory\[0\]"):
        tokenprobe.load("tiny-llama", device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"})


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_dir_arguments(parser)
    add_placement_arguments(parser)
    return parser.parse_args(["--out", "runs/x", *argv])


def test_cli_placement_options():
    assert placement(parse()) == {"device": "cpu"}
    assert placement(parse("--device-map", "auto", "--max-memory", "cpu=1.5GB,disk=2KiB",
                           "--offload-folder", "off")) == {
        "device_map": "auto", "max_memory": {"cpu": 1_500_000_000, "disk": 2048},
        "offload_folder": "off"}
    assert placement(parse("--device-map", '{"model.layers.0": "cpu", "": "disk"}')) == {
        "device_map": {"model.layers.0": "cpu", "": "disk"}}
    chosen = parse("--device-map", "auto")
    chosen.device = "cuda:0"  # as parsed on a machine with a GPU
    with pytest.raises(UsageError, match="pick one of --device cuda:0 .* and --device-map"):
        placement(chosen)
    with pytest.raises(UsageError, match="--max-memory only apply with --device-map"):
        placement(parse("--max-memory", "cpu=1GiB"))


@pytest.mark.parametrize("argv, message", [
    (["--device-map", "{bad json"], "is not valid JSON"),
    (["--device-map", "everywhere"], "must be auto, balanced"),
    (["--device-map", '{"lm_head": [0]}'], "a device is a GPU index"),
    (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "DEVICE=SIZE pairs"),
    (["--device-map", "auto", "--max-memory", "ram=1GiB"], "'ram' is not a device"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not a size"),
])
def test_cli_placement_errors_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
