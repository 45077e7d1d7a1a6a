"""The Ray engine: `tokenprobe.run` over a pool of Ray actors (`tokenprobe run --engine ray`).

The driver reads the prompts into the same windows as `tokenprobe.run` (same boundaries, same
digests), and Ray Data sends each pending window to one actor of a pool; every actor loads the
model once, runs the window (`runner.run_window`) and writes it as that part of the staged run
itself (`store.write_part`), returning only the part's index and row counts. The driver holds the
run's lock, and publishes the run once every part is there (`runner.finish`). A part is the same
files whichever process, engine or try wrote it, so a Ray run and a single-process run of the
same settings resume each other, and a window retried after its actor died replaces what the
dead try left. Ray is imported inside the functions: this module imports without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenprobe.engine_ray_worker import WindowWorker, raise_failure
from tokenprobe.runner import (WINDOW, attention_request, check_no_extra_parts, check_options,
                               check_resumed, finish, prompt_stream, prompts_digest,
                               run_settings, window_options, windows)
from tokenprobe.store import MARKERS, Run, RunWriter, check_target

RAY_MISSING = "the ray engine needs Ray Data: pip install 'tokenprobe[ray]'"


class RayMissingError(ImportError):
    """Ray (with Ray Data) is not installed; the message says what to install."""


def require_ray() -> Any:
    """The `ray` module with Ray Data, or `RayMissingError`."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayMissingError(f"{RAY_MISSING} ({err})") from err
    return ray


def run_ray(model: str, prompts: Any, probes: dict[str, dict] | None = None, *,
            load_options: dict | None = None, backend: str = "hf", workers: int = 2,
            gpus_per_worker: float = 0, address: str | None = None, batch_size: int = 8,
            window: int = WINDOW, truncate: bool = False, max_tokens: int | None = None,
            out: str | os.PathLike, overwrite: bool = False, progress: bool = True,
            seed: int = 0) -> Run:
    """`tokenprobe.run` over a pool of `workers` Ray actors: the same run directory, part for
    part (its tables equal those of a single-process run of the same settings, and either
    engine resumes the other's run).

    Each actor loads `model` once (`tokenprobe.load(model, **load_options)`), takes windows of
    prompts from Ray Data (one window per call) and writes each as one part of the run staged
    beside `out`; the driver never loads the model (a short-lived actor reports its metadata
    first: one extra load, on a worker). A worker that dies (killed, preempted, out of memory)
    is restarted by Ray and its window run again (Ray Data's actor fault tolerance, on by
    default), at most `engine_ray_worker.TRIES` times in all; the window's files are replaced, never duplicated.
    An interrupted run resumes from its finished parts when run again with the same arguments
    (by either engine).

    On a cluster, `out` must be on a filesystem every node shares (the actors write the parts
    there, the driver publishes them), and every node needs the same environment (tokenprobe,
    its extras, the model at the same path or in the same cache).

    Memory: the driver reads the whole corpus before the first window runs, one window at a
    time, putting each pending window in Ray's object store (spilled to disk past its
    capacity); the driver's own memory is one window plus a few bytes per part. Each actor
    holds the model and one window's tables.

    Args:
        model: a model name or path, as `tokenprobe.load` takes it (loaded in every actor).
        prompts: what `tokenprobe.run` takes: texts, an iterable of texts, or a `Corpus`.
        probes: probe name -> its option values (what `Probe.from_options` takes), or probe
            names (default options); None runs the probes `tokenprobe.run` chooses for
            `backend`. Options naming a model (the entropy probe's `compare`) load it in
            every actor, with `load_options`.
        load_options: `tokenprobe.load` keywords (dtype, device, device_map, max_memory, ...).
            With `gpus_per_worker` > 0 and neither `device` nor `device_map`, each actor loads
            the model on its GPU ("cuda": Ray gives every actor its own).
        backend: "hf", "bridge" or "nnsight" (`tokenprobe.backends.BACKENDS`), as --backend.
        workers: actors in the pool (each holds a copy of the model).
        gpus_per_worker: GPUs Ray reserves for each actor (0: CPU; 1 on a GPU cluster;
            fractions share a GPU).
        address: the Ray cluster to connect to ("auto", "ray://head:10001"); None starts a
            local one. A Ray already initialised in this process is used as it is.
        batch_size, window, truncate, max_tokens, overwrite, progress, seed: as `tokenprobe.run`
            (each part runs from `torch.manual_seed(seed + part index)`; the probes'
            forwards are deterministic).
        out: the run directory (required).

    Raises:
        RayMissingError: Ray Data is not installed.
        ValueError: no prompts, `batch_size`, `window` or `max_tokens` < 1, `workers` < 1,
            `gpus_per_worker` < 0, an unknown backend or probe, or a bad probe option.
        tokenprobe.backends.UnsupportedSite: a probe the backend cannot run.
        RuntimeError: a window lost its worker `engine_ray_worker.TRIES` times (the parts written are kept).
        tokenprobe.tokens.PromptError, tokenprobe.models.ModelError, and the run directory's
            errors (`tokenprobe.run`'s), raised as the worker raised them.
    """
    check_options(batch_size, window, max_tokens)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if out is None:
        raise ValueError("run_ray needs out: the workers write the run's parts there")
    check_target(Path(out), overwrite=overwrite)  # before any model loads
    load_options = worker_load_options(load_options, gpus_per_worker)
    driver_probes, values = local_probes(probes, backend)
    stream, described, total = prompt_stream(prompts)
    options = window_options(described, batch_size=batch_size, truncate=truncate,
                             max_tokens=max_tokens)
    ray = require_ray()
    from tokenprobe.kernels import selfcheck

    spec = {"model": model, "load_options": load_options, "backend": backend,
            "probes": values, "options": options, "seed": seed,
            "selfcheck": selfcheck.enabled()}
    with connected(ray, address, workers):
        cpus = cpus_per_worker(ray, workers, gpus_per_worker)
        found = describe_model(ray, spec, cpus, gpus_per_worker)
        settings = run_settings(found["probes"], described, batch_size=batch_size,
                                window=window, truncate=truncate, max_tokens=max_tokens,
                                seed=seed)
        with RunWriter(Path(out).absolute(), **found["writer"], settings=settings,
                       overwrite=overwrite) as writer:
            done, digests, pending = writer.done(), [], []
            from tqdm.auto import tqdm

            with tqdm(total=total, desc="prompts", unit="prompt", disable=not progress) as bar:
                for index, part in enumerate(windows(stream(), window)):
                    digests.append(prompts_digest(part))
                    if index in done:
                        check_resumed(writer, index, digests[-1])
                        bar.update(len(part))
                        continue
                    rows = [dataclasses.astuple(p) for p in part]
                    pending.append({"part": index, "digest": digests[-1], "n": len(part),
                                    "window": ray.put(rows)})
                check_no_extra_parts(writer, done, len(digests))
                kernels: dict[str, dict] = {}
                if pending:
                    writer._stage()
                    for tries in (writer.staging / MARKERS).glob("*.tries"):
                        tries.unlink()  # the tries of an interrupted run do not count
                    results = run_pool(ray, pending, spec, writer.staging.absolute(),
                                       workers=workers, cpus=cpus,
                                       gpus_per_worker=gpus_per_worker)
                    with contextlib.closing(results):  # stops the pool on an error, at once
                        for result in results:
                            merge_kernels(kernels, json.loads(result["kernels"]))
                            bar.update(int(result["n_prompts"]))
            missing = sorted({r["part"] for r in pending} - writer.done())
            if missing:
                raise RuntimeError(f"Ray finished without writing part(s) {missing} of the run "
                                   f"staged at {writer.staging}; run the same command again "
                                   "to resume it")
            del pending  # the windows' object-store copies
            return finish(writer, driver_probes, digests, kernels)


def worker_load_options(load_options: dict | None, gpus_per_worker: float) -> dict:
    """`tokenprobe.load`'s keywords in the actors: on their GPU when they have one and no
    device or device_map is given."""
    chosen = dict(load_options or {})
    if gpus_per_worker > 0 and chosen.get("device") is None and chosen.get("device_map") is None:
        chosen["device"] = "cuda"
    return chosen


class _Unloaded:
    """What the driver's probes hold for an option naming a model: its name, never its
    weights (the actors load it; the driver's probes only validate options and finish the
    run, which needs no model)."""

    def __init__(self, name: str) -> None:
        self.name, self.fingerprint = name, None


def local_probes(probes: dict[str, dict] | None, backend: str) -> tuple[list, dict | None]:
    """The driver's probes (options validated, sites checked against `backend` before Ray
    starts; they finish the run) and the option values the actors build theirs from."""
    from tokenprobe.backends import BACKENDS
    from tokenprobe.probe import registry

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    cls, known = BACKENDS[backend], registry()
    if probes is not None and not isinstance(probes, Mapping):
        probes = {name: {} for name in probes}  # names: each with its default options
    chosen = ({n: {} for n, c in known.items() if set(c.sites) <= cls.sites} if probes is None
              else {n: dict(v or {}) for n, v in probes.items()})
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown probe {unknown[0]!r}; available: {', '.join(known)}")
    cls.check({n: known[n].sites for n in chosen}, {n: c.sites for n, c in known.items()})
    built = [known[n].from_options(v, _Unloaded) for n, v in chosen.items()]
    attention_request(built)
    return built, (None if probes is None else chosen)


@contextlib.contextmanager
def connected(ray: Any, address: str | None, workers: int):
    """Ray as this process finds it, else connected to `address`, else a local Ray with this
    machine's CPUs (at least one per worker), shut down on exit."""
    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False)
    else:
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()


def cpus_per_worker(ray: Any, workers: int, gpus_per_worker: float) -> int:
    """CPUs each actor reserves (and torch's thread count in it): 1 beside a GPU; without one,
    the cluster's CPUs shared out among the workers, at most one node's."""
    if gpus_per_worker > 0:
        return 1
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(total // workers, int(max(nodes, default=1))))


def describe_model(ray: Any, spec: dict, cpus: int, gpus_per_worker: float) -> dict:
    """From one short-lived actor (so the driver never loads the model): `RunWriter`'s model
    keywords (model metadata, name, fingerprint, meta) and the probes' descriptions."""
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus_per_worker)(WindowWorker).remote(
        spec, None, cpus)
    try:
        found = ray.get(actor.describe.remote())
    finally:
        ray.kill(actor)
    raise_failure(found["error"])
    return found


def run_pool(ray: Any, pending: list[dict], spec: dict, staging: Path, *, workers: int,
             cpus: int, gpus_per_worker: float):
    """Each result row (part, n_prompts, tables, kernels) as its window is written: Ray Data
    rows, one block and one actor call per window, over an actor pool of `workers`; a
    worker's error is raised here as itself (the pool stops)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    quiet = {"enable_progress_bars": False, "print_on_execution_start": False,  # ours: tqdm
             "enable_fallback_to_arrow_object_ext_type": True}  # the window's ObjectRef column
    saved = {k: getattr(context, k) for k in quiet if hasattr(context, k)}
    for key in saved:
        setattr(context, key, quiet[key])
    iterator = None
    try:
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending))
        results = dataset.map_batches(
            WindowWorker, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"spec": spec, "staging": str(staging), "cpus": cpus},
            num_cpus=cpus, num_gpus=gpus_per_worker)  # restarts, retries: Ray Data's defaults
        iterator = iter(results.iter_rows())
        for row in iterator:
            raise_failure(row["error"])
            yield row
    finally:
        if iterator is not None:
            getattr(iterator, "close", lambda: None)()  # stops the pool when the driver stops
        for key, value in saved.items():
            setattr(context, key, value)


def merge_kernels(into: dict[str, dict], ran: dict[str, dict]) -> None:
    """Add one window's `selfcheck.ran()` to `into`, as that process would have recorded both:
    the implementations joined with "+", checked if any was, passed unless one failed."""
    for op, entry in ran.items():
        known = into.get(op)
        if known is None:
            into[op] = dict(entry)
            continue
        impls = known["impl"].split("+")
        known["impl"] = "+".join(impls + [i for i in entry["impl"].split("+") if i not in impls])
        known["checked"] = bool(known["checked"] or entry["checked"])
        if entry["passed"] is not None:
            known["passed"] = entry["passed"] and known["passed"] is not False
        known["error"] = known["error"] or entry["error"]
