"""Model registry and cache: builds, fingerprints, and corrupt or partial caches rebuilt."""
from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

import tokenprobe
from tokenprobe import models


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPROBE_CACHE", str(tmp_path))
    return tmp_path


def test_tiny_models_are_seeded_and_cached(fresh_cache):
    a = tokenprobe.load("tiny-llama")
    directory = fresh_cache / "models" / "tiny-llama"
    manifest = json.loads((directory / models.MANIFEST).read_text())
    assert a.fingerprint == "sha256:" + manifest["files"]["model.safetensors"]["sha256"]
    b = tokenprobe.load("tiny-llama")
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.model.config.num_hidden_layers == 3
    ids = a.tokenizer("héllo")["input_ids"]  # one token per UTF-8 byte, no BOS
    assert len(ids) == 6 and a.tokenizer.decode(ids) == "héllo"


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "delete"])
def test_damaged_cache_is_rebuilt_not_used(fresh_cache, damage):
    good = tokenprobe.load("tiny-gemma3")
    directory = fresh_cache / "models" / "tiny-gemma3"
    weights = directory / "model.safetensors"
    if damage == "flip":  # same size, one byte changed deep in the tensor data
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "manifest":
        (directory / models.MANIFEST).unlink()
    else:
        weights.unlink()
    assert models.cache_problem(directory) is not None
    with pytest.warns(UserWarning, match="rebuilding the cache"):
        again = tokenprobe.load("tiny-gemma3")
    assert models.cache_problem(directory) is None
    assert again.fingerprint == good.fingerprint


def test_cache_manifest_lists_file_names_never_paths(fresh_cache):
    tokenprobe.load("tiny-llama")
    directory = fresh_cache / "models" / "tiny-llama"
    outside = fresh_cache / "outside.bin"  # directory / "../../outside.bin"
    outside.write_bytes(b"x")
    manifest = json.loads((directory / models.MANIFEST).read_text())
    manifest["files"]["../../outside.bin"] = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    (directory / models.MANIFEST).write_text(json.dumps(manifest))
    assert "not a file name" in models.cache_problem(directory)


def test_dtype_and_local_directory(fresh_cache):
    tokenprobe.load("tiny-llama")
    directory = fresh_cache / "models" / "tiny-llama"
    loaded = tokenprobe.load(str(directory), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.fingerprint.startswith("params:")


def test_unknown_name_fails_fast_with_a_suggestion():
    start = time.perf_counter()
    with pytest.raises(models.ModelError, match="did you mean 'smollm2-135m'"):
        tokenprobe.load("smollm2")
    assert time.perf_counter() - start < 5  # no hub retries for a bare name


def test_describe_reads_architecture_without_loading():
    row = models.describe("tiny-gemma3")
    assert (row["layers"], row["heads"], row["kv_heads"], row["width"]) == (4, 4, 1, 64)


@pytest.mark.embedded
def test_describe_embedded_models(smollm2, gemma3):
    smol = models.describe("smollm2-135m")
    assert (smol["layers"], smol["heads"], smol["width"], smol["vocab"]) == (30, 9, 576, 49152)
    assert smol["weights"] == "cached"
    gem = models.describe("gemma3-270m")
    assert (gem["layers"], gem["width"], gem["vocab"]) == (18, 640, 262144)
