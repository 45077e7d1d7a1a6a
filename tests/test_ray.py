"""The Ray engine (`tokenprobe.engine_ray.run_ray`, `tokenprobe run --engine ray`) on a real
local Ray cluster (Ray has no local mode): two actors give the tables of a single-process run,
a worker killed mid-window is retried with nothing lost or doubled, and an interrupted run
resumes from its finished parts without redoing them."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import ray

import tokenprobe
from tokenprobe.cli.args import EXIT_OK, EXIT_USAGE
from tokenprobe.cli.main import main
from tokenprobe.corpus import Corpus
from tokenprobe.engine_ray import run_ray
from tokenprobe.probe import registry
from tokenprobe.store import open_run, staging_dir

# varied lengths, so that each window sorts its prompts into batches
TEXTS = [f"Prompt {i}: the cat sat on the mat" + " and the dog ran" * (i % 5) + "."
         for i in range(13)]
LONG = [f"Story {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40 + 9 * (i % 4)))
        for i in range(16)]
WORKER = "ray::MapWorker("  # the process title of a Ray Data pool actor


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def single(loaded, prompts, out: Path, **options):
    return tokenprobe.run(loaded, prompts, out=out, progress=False, **options)


def assert_same_run(got, want) -> None:
    """Every table equal, frame for frame, and the same run-level figures."""
    assert sorted(got.tables) == sorted(want.tables)
    for name in want.tables:
        pd.testing.assert_frame_equal(got.tables[name], want.tables[name], obj=name)
    for key in ("model", "weights_fingerprint", "probes", "corpus", "window", "batch_size",
                "n_prompts", "prompts_sha256", "summary", "parts", "backend", "kernels"):
        assert got.meta.get(key) == want.meta.get(key), key


def corpus_file(tmp_path: Path, texts: list[str]) -> str:
    """A .jsonl corpus with an id per record (the run's prompts.doc_id)."""
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                              for i, t in enumerate(texts)))
    return str(source)


def test_two_workers_give_the_single_process_tables(cluster, tiny_llama, tmp_path, capsys):
    """`tokenprobe run --engine ray` (two workers, the default) over a corpus file with doc
    ids, probe options given as flags, and a window (4) that does not divide 13 prompts."""
    source = corpus_file(tmp_path, TEXTS)
    assert main(["run", "--engine", "ray", "--model", "tiny-llama", "--prompts", source,
                 "--probes", "sinks,entropy", "--sinks-eps", "0.2",
                 "--lens", "--window", "4", "--batch-size", "3", "--out",
                 str(tmp_path / "ray"), "--quiet"]) == EXIT_OK
    assert "run saved to" in capsys.readouterr().out
    probes = [registry()["sinks"].from_options({"eps": 0.2}),
              registry()["entropy"].from_options({"lens": True})]
    want = single(tiny_llama, Corpus([source]), tmp_path / "single", probes=probes, window=4,
                  batch_size=3)
    got = open_run(tmp_path / "ray")
    assert_same_run(got, want)
    assert got.meta["parts"]["tokens"] == 4 and "doc_id" in got.tables["prompts"]
    assert "lens_entropy" in got.tables["token_layers"]


def test_cli_refuses_ray_options_without_ray(capsys, tmp_path, monkeypatch):
    argv = ["run", "--model", "tiny-llama", "--prompt", "hi", "--out", str(tmp_path / "r")]
    assert main([*argv, "--workers", "3"]) == EXIT_USAGE
    assert "--workers belongs to the Ray engine; add --engine ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*argv, "--engine", "ray"]) == EXIT_USAGE
    assert "pip install 'tokenprobe[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.embedded
def test_two_workers_on_smollm2(cluster, smollm2, tmp_path):
    got = run_ray("smollm2-135m", TEXTS[:4], workers=2, window=2, batch_size=2,
                  out=tmp_path / "ray", progress=False)  # the default probes
    assert_same_run(got, single(smollm2, TEXTS[:4], tmp_path / "single", window=2,
                                batch_size=2))


def tries(staging: Path) -> dict[int, dict]:
    """Window -> its tries file ({"tries", "pid"}), while the run is staged."""
    found = {}
    for file in (staging / "_parts").glob("*.tries"):
        with_retry = None
        for _ in range(3):  # written atomically, but it may be replaced while listed
            try:
                with_retry = json.loads(file.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        if with_retry is not None:
            found[int(file.stem)] = with_retry
    return found


def kill_one_window(staging: Path, seen: dict, stop: threading.Event) -> None:
    """Kill (SIGKILL) the worker of a window it has started and not finished (its tries file
    names the pid), then wait for that window's retry: `seen` gets the pid killed, the window
    retried and the pid that retried it."""
    while not stop.is_set():
        running = {i: t for i, t in tries(staging).items()
                   if not (staging / "_parts" / f"{i:06d}.json").exists()}
        if not running:
            time.sleep(0.005)
            continue
        index, entry = next(iter(running.items()))
        os.kill(entry["pid"], signal.SIGKILL)
        seen["pid"] = entry["pid"]
        while not stop.is_set():
            entry = tries(staging).get(index, entry)
            if entry["tries"] >= 2:
                seen["retried"], seen["retry_pid"] = index, entry["pid"]
                return
            if (staging / "_parts" / f"{index:06d}.json").exists():
                break  # it finished just before the kill: kill another
            time.sleep(0.01)


def test_a_killed_worker_is_retried_and_nothing_is_lost(cluster, tiny_llama, tmp_path):
    out = tmp_path / "ray"
    seen: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_one_window, args=(staging_dir(out), seen, stop))
    killer.start()
    try:
        got = run_ray("tiny-llama", LONG, workers=2, window=3, batch_size=3, out=out,
                      progress=False)
    finally:
        stop.set()
        killer.join()
    assert "retried" in seen, f"no window was retried after killing a worker: {seen}"
    assert seen["retry_pid"] != seen["pid"]  # a restarted actor ran it again
    assert_same_run(got, single(tiny_llama, LONG, tmp_path / "single", window=3, batch_size=3))


def interrupt_after(staging: Path, parts: int, stop: threading.Event) -> None:
    """Ctrl-C (SIGINT to this process) once `parts` parts are finished."""
    while not stop.is_set():
        if len(list((staging / "_parts").glob("[0-9]*.json"))) >= parts:
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.005)


def pool_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or []).startswith(WORKER):
            found.append(process)
    return found


def test_an_interrupted_run_resumes_without_redoing_its_parts(cluster, tiny_llama, tmp_path):
    out = tmp_path / "ray"
    staging = staging_dir(out)
    stop = threading.Event()
    watcher = threading.Thread(target=interrupt_after, args=(staging, 2, stop))
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ray("tiny-llama", LONG, workers=2, window=2, batch_size=2, out=out,
                    progress=False)
    finally:
        stop.set()
        watcher.join()
    deadline = time.monotonic() + 30
    while pool_workers() and time.monotonic() < deadline:  # the pool is shut down
        time.sleep(0.1)
    assert not out.exists()
    done = {int(f.stem) for f in (staging / "_parts").glob("[0-9]*.json")}
    assert 2 <= len(done) < len(LONG) // 2
    written = {i: (staging / "heads" / f"part-{i:06d}.parquet").stat().st_mtime_ns for i in done}

    got = run_ray("tiny-llama", LONG, workers=2, window=2, batch_size=2, out=out,
                  progress=False)
    assert {i: (out / "heads" / f"part-{i:06d}.parquet").stat().st_mtime_ns
            for i in done} == written  # the finished parts were kept, not run again
    assert_same_run(got, single(tiny_llama, LONG, tmp_path / "single", window=2, batch_size=2))
    assert open_run(out).meta["status"] == "complete"
