"""The Ray engine's actor: `WindowWorker` loads the model and probes once and runs windows,
writing each as its part of the staged run; errors go back to the driver pickled (`failure`),
to be raised there as themselves (`raise_failure`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenprobe.runner import bound_probes, prompts_digest, writer_model
from tokenprobe.rundir import write_json
from tokenprobe.store import MARKERS, model_meta, write_part

TRIES = 4  # of one window in one run: its actor died the other times (an error is not retried)
TRY_FILE = "{index:06d}.tries"  # in the staging dir's _parts/: a window's tries in this run, the
#                                 last one's pid (removed with _parts when the run is published)


def failure(err: Exception) -> bytes:
    """`err` pickled for the driver to raise as itself (PromptError, ModelError, ...): Ray
    would hand it over as its own wrapper, with only the text of the original."""
    import pickle

    try:
        blob = pickle.dumps(err)
        pickle.loads(blob)
    except Exception:  # an exception that does not survive pickling: its type and text
        blob = pickle.dumps(RuntimeError(f"{type(err).__module__}.{type(err).__qualname__}: "
                                         f"{err}"))
    return blob


def raise_failure(blob: bytes | None) -> None:
    """Raise the exception a worker returned (`failure`), if any."""
    if blob:
        import pickle

        raise pickle.loads(blob)


class WindowWorker:
    """One actor of the pool: the model and probes, loaded once; each call runs one window and
    writes it as its part of the run staged at `staging` (None: the metadata actor). An error
    (loading, a prompt too long, ...) is returned to the driver, which raises it; Ray retries
    a window only when its actor dies."""

    def __init__(self, spec: dict, staging: str | None, cpus: int) -> None:
        self.spec, self.staging = spec, Path(staging) if staging is not None else None
        self.error: bytes | None = None
        try:
            self._load(int(cpus))
        except Exception as err:
            self.error = failure(err)

    def _load(self, cpus: int) -> None:
        import torch

        import tokenprobe
        from tokenprobe.backends import BACKENDS, resolve
        from tokenprobe.kernels import selfcheck
        from tokenprobe.probe import registry

        torch.set_num_threads(max(1, cpus))
        selfcheck.set_enabled(self.spec["selfcheck"])
        options = self.spec["load_options"]

        def load(name: str):
            return tokenprobe.load(name, **options)

        loaded = load(self.spec["model"])
        self.backend = resolve(BACKENDS[self.spec["backend"]].over(loaded), loaded.tokenizer)
        known, values = registry(), self.spec["probes"]
        self.probes = bound_probes(self.backend, None if values is None else [
            known[n].from_options(v, load) for n, v in values.items()])

    def describe(self) -> dict:
        """`RunWriter`'s model keywords (the model as `model_meta` describes it), the probes'
        descriptions, and the error that kept the model from loading (or None)."""
        if self.error:
            return {"error": self.error}
        writer = writer_model(self.backend)
        writer["model"] = model_meta(writer["model"], writer["name"], writer["fingerprint"])
        return {"writer": writer, "probes": [p.describe() for p in self.probes], "error": None}

    def count_try(self, index: int) -> None:
        """Record one more try of window `index` (and the process trying it) in the staging
        dir; RuntimeError (not retried) past `TRIES`."""
        file = self.staging / MARKERS / TRY_FILE.format(index=index)
        tries = json.loads(file.read_text())["tries"] + 1 if file.exists() else 1
        if tries > TRIES:
            raise RuntimeError(
                f"window {index} (part {index}) lost its worker {TRIES} times (killed for "
                "memory, or its node lost?): give the workers more memory, or run smaller "
                "windows (--window) or batches (--batch-size); the parts written are kept, run "
                "the same command again to resume")
        write_json({"tries": tries, "pid": os.getpid()}, file)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out: dict[str, list] = {"part": [], "n_prompts": [], "tables": [], "kernels": [],
                                "error": []}
        for index, digest, ref in zip(batch["part"], batch["digest"], batch["window"]):
            try:
                tables, kernels, n = self._window(int(index), str(digest), ref)
                row = [json.dumps({t: len(f) for t, f in tables.items()}), kernels, n, None]
            except Exception as err:
                row = ["{}", "{}", 0, failure(err)]
            for key, value in zip(("tables", "kernels", "n_prompts", "error"), row):
                out[key].append(value)
            out["part"].append(int(index))
        return {k: np.array(v, dtype=object if k == "error" else None) for k, v in out.items()}

    def _window(self, index: int, digest: str, ref: Any) -> tuple[dict, str, int]:
        """Run window `index` and write it: (its tables, `selfcheck.ran()` as JSON, prompts)."""
        import ray
        import torch

        from tokenprobe.corpus import Prompt
        from tokenprobe.kernels import selfcheck
        from tokenprobe.runner import run_window

        if self.error:
            raise_failure(self.error)
        self.count_try(index)
        part = [Prompt(int(i), *rest) for i, *rest in ray.get(ref)]
        got = prompts_digest(part)
        if got != digest:  # the transfer, or another tokenprobe in the worker than the driver
            ids = [p.prompt_id for p in part]
            raise RuntimeError(
                f"window {index} (prompts {ids[0] if ids else '-'}..{ids[-1] if ids else '-'}) "
                f"reached its worker with texts of sha256 {got[:12]}, not {digest[:12]} as "
                "the driver read them: are the driver and the workers running the same "
                "tokenprobe?")
        selfcheck.reset_ran()
        torch.manual_seed(self.spec["seed"] + index)
        tables = run_window(self.backend, self.probes, part, **self.spec["options"])
        write_part(self.staging, index, tables,
                   {"prompts_sha256": digest, "n_prompts": len(part)})
        return tables, json.dumps(selfcheck.ran(), default=str), len(part)
