"""tokenprobe: token-level interpretability of language models, reduced inside the hooks.

The top-level names load on first use, so `import tokenprobe.cli.main` (and `tokenprobe --help`)
does not import torch and transformers.
"""
from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MODEL": "tokenprobe.models", "LoadedModel": "tokenprobe.models",
    "load": "tokenprobe.models", "run": "tokenprobe.runner", "Run": "tokenprobe.store",
    "open_run": "tokenprobe.store",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tokenprobe.models import DEFAULT_MODEL, LoadedModel, load
    from tokenprobe.runner import run
    from tokenprobe.store import Run, open_run


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (loaded or not), the submodules imported so far and the module's own
    dunders: what `dir(tokenprobe)` and tab completion list."""
    loaded = {name for name, value in globals().items() if isinstance(value, types.ModuleType)
              and value.__name__.startswith(__name__ + ".")}
    dunders = {name for name in globals() if name.startswith("__")}
    return sorted({*__all__, *loaded, *dunders})
