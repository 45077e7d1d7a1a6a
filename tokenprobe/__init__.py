"""tokenprobe: token-level interpretability of language models, reduced inside the hooks."""
from tokenprobe.models import DEFAULT_MODEL, LoadedModel, load
from tokenprobe.runner import run
from tokenprobe.store import Run, open_run

__all__ = ["DEFAULT_MODEL", "LoadedModel", "Run", "load", "open_run", "run"]
