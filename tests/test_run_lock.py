"""One writer per run: the run lock, its hand-over to the worker, and the two races it closes.

Workers here are a stand-in process (tests/stand_in_worker.py) or a lock held in-process, so
these tests need no model and no training; tests/test_runs.py drives real workers.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefixlab.engine.distributed import LaunchError
from prefixlab.engine.models import ModelInfo, PrefixShape
from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.train import TrainConfig
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.locks import RunBusy, RunLock, run_lock_held
from prefixlab.runs.registry import RunStore
from prefixlab.runs.worker import run_worker

STAND_IN = Path(__file__).resolve().parent / "stand_in_worker.py"
INFO = ModelInfo("tiny-model", PrefixShape(2, 2, 8), 10_000)


@pytest.fixture
def store(tmp_path) -> RunStore:
    store = RunStore(tmp_path / "data")
    store.worker_command = [sys.executable, str(STAND_IN)]
    # Keep each worker's Popen: without a holder, subprocess reaps an exited child at its
    # next Popen anywhere in the process, and its pid would be gone before the test waits.
    store.spawned = []

    def spawn(*args, **kwargs):
        proc = type(store)._spawn(store, *args, **kwargs)  # looked up now: tests patch it
        store.spawned.append(proc)
        return proc

    store._spawn = spawn
    return store


@pytest.fixture
def make_run(store, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(20)))
    cfg = RunConfig(train_csv=str(csv), text_column="text", label_column="label",
                    model="tiny-model", prefix=PrefixConfig(prefix_length=2),
                    training=TrainConfig(epochs=1, batch_size=4))
    return lambda: store.create(cfg, INFO, name="locked")


@pytest.fixture
def run_id(make_run) -> str:
    return make_run()


class Release:
    """Holds `release.lock` so a stand-in worker waits; `release()` lets it finish."""

    def __init__(self, run_dir: Path) -> None:
        self.file = open(run_dir / "release.lock", "w")  # noqa: SIM115 - closed by release()
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        self.file.close()


def _worker(store: RunStore, run_id: str) -> subprocess.Popen:
    """The last worker started (its pid is the one the registry holds)."""
    proc = store.spawned[-1]
    assert store.get(run_id).pid == proc.pid
    return proc


def _state(store: RunStore, run_id: str) -> tuple[str, str]:
    """The registry's state and status.json's state."""
    status = json.loads(store.folder(run_id).status_path.read_text())
    return store.get(run_id).state, status["state"]


def test_start_hands_the_lock_to_the_worker_which_alone_writes_the_status(store, run_id):
    folder = store.folder(run_id).path
    gate = Release(folder)
    store.start(run_id)
    worker = _worker(store, run_id)
    # The starter closed its descriptor; the worker's inherited copy still holds the lock.
    assert run_lock_held(folder)
    store.refresh()
    assert store.get(run_id).state in ("queued", "running")
    gate.release()
    assert worker.wait(timeout=30) == 0
    assert not run_lock_held(folder)
    store.refresh()
    assert _state(store, run_id) == ("completed", "completed")  # the worker's last word stands


def test_a_second_start_while_the_worker_lives_is_refused(store, run_id):
    gate = Release(store.folder(run_id).path)
    store.start(run_id)
    with pytest.raises(RunBusy, match="already queued or running"):
        store.start(run_id, resume=True)
    with pytest.raises(RunBusy, match="cancel it before deleting"):
        store.delete(run_id)
    gate.release()
    assert _worker(store, run_id).wait(timeout=30) == 0


def test_the_lock_is_held_from_the_start_until_the_hand_over(store, run_id, monkeypatch):
    """The window the old check-then-spawn left open: between deciding to start and the
    worker existing, a second start must already find the lock taken."""
    folder = store.folder(run_id).path
    gate = Release(folder)
    seen = []
    spawn = RunStore._spawn

    def spawn_and_look(self, *args, **kwargs):
        seen.append(("before spawn", _free_now(folder)))
        proc = spawn(self, *args, **kwargs)
        seen.append(("after spawn", _free_now(folder)))
        return proc

    monkeypatch.setattr(RunStore, "_spawn", spawn_and_look)
    store.start(run_id)
    assert seen == [("before spawn", False), ("after spawn", False)]
    gate.release()
    assert _worker(store, run_id).wait(timeout=30) == 0


def _free_now(run_dir: Path) -> bool:
    """Could another starter take the run lock right now? (without the claim lock, which
    the start under test holds)"""
    fd = os.open(run_dir / "run.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_concurrent_resumes_start_exactly_one_worker(store, run_id):
    folder = store.folder(run_id).path
    gate = Release(folder)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def click():
        barrier.wait()
        try:
            store.start(run_id, resume=True)
            outcomes.append("started")
        except RunBusy:
            outcomes.append("refused")

    threads = [threading.Thread(target=click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["started"]
    log = (folder / "worker.log").read_bytes()
    assert log == b""  # one stand-in, which wrote nothing (no refusal from a second one)
    gate.release()
    assert _worker(store, run_id).wait(timeout=30) == 0
    store.refresh()
    assert _state(store, run_id) == ("completed", "completed")


class _InProcessWorker:
    """A worker simulated in this process: the run lock held on a description of its own."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.lock = RunLock.claim(folder.path)
        folder.set_status("running", step=3)
        self.done = False

    def finish(self, state: str | None = "completed") -> None:
        """Write the last status (None: die without one, like a SIGKILL) and let go."""
        if not self.done:
            if state:
                self.folder.set_status(state, step=8)
            self.lock.close()
            self.done = True


class ObservedSteps:
    """Calls `self.before` before every step of a refresh that observes a run folder:
    trying the run lock and reading the status."""

    def __init__(self, monkeypatch) -> None:
        import prefixlab.runs.registry as runs

        self.before = lambda: None
        try_lock, status = runs.try_run_lock, RunFolder.status

        def observed_try_lock(*a, **k):
            self.before()
            return try_lock(*a, **k)

        def observed_status(folder):
            self.before()
            return status(folder)

        monkeypatch.setattr(runs, "try_run_lock", observed_try_lock)
        monkeypatch.setattr(RunFolder, "status", observed_status)

    def count(self, refresh) -> int:
        n = [0]
        self.before = lambda: n.__setitem__(0, n[0] + 1)
        refresh()
        self.before = lambda: None
        return n[0]

    def at(self, k: int, event) -> None:
        """Run `event` before the k-th observing step (0-based) from now."""
        calls = [0]

        def before():
            if calls[0] == k:
                event()
            calls[0] += 1

        self.before = before


@pytest.mark.parametrize("last_word", ["completed", "cancelled", "failed"])
def test_a_worker_finishing_at_any_point_of_a_refresh_is_never_marked_interrupted(
    store, make_run, monkeypatch, last_word
):
    """The race the old refresh lost: it read "running", then the worker wrote its last
    status and exited, then the pid check said dead, and "interrupted" overwrote it. Here
    the worker finishes before each observing step of the refresh in turn, and after it."""
    steps = ObservedSteps(monkeypatch)
    probe = _InProcessWorker(store.folder(make_run()))
    n = steps.count(store.refresh)  # the observing steps of one refresh of a live run
    probe.finish()
    assert n >= 2
    for k in range(n + 1):
        run_id = make_run()
        worker = _InProcessWorker(store.folder(run_id))
        steps.at(k, lambda worker=worker: worker.finish(last_word))
        store.refresh()
        assert store.get(run_id).state == ("running" if k == n else last_word)
        worker.finish(last_word)  # k == n: it finishes after the refresh
        store.refresh()
        assert _state(store, run_id) == (last_word, last_word), f"finished before step {k}"


def test_a_worker_dying_at_any_point_of_a_refresh_is_marked_interrupted(
    store, make_run, monkeypatch
):
    steps = ObservedSteps(monkeypatch)
    probe = _InProcessWorker(store.folder(make_run()))
    n = steps.count(store.refresh)
    probe.finish()
    for k in range(n + 1):
        run_id = make_run()
        worker = _InProcessWorker(store.folder(run_id))
        steps.at(k, lambda worker=worker: worker.finish(None))
        store.refresh()  # saw it alive (it died later) or dead
        worker.finish(None)
        store.refresh()
        assert _state(store, run_id) == ("interrupted", "interrupted"), f"died before step {k}"
        assert "ended without finishing" in store.get(run_id).error


def test_a_killed_worker_is_interrupted_and_the_run_resumes(store, run_id):
    folder = store.folder(run_id).path
    gate = Release(folder)
    store.start(run_id)
    worker = _worker(store, run_id)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(timeout=30) == -signal.SIGKILL
    store.refresh()
    assert _state(store, run_id) == ("interrupted", "interrupted")
    store.start(run_id, resume=True)  # the lock is free again: a resume starts
    gate.release()
    assert _worker(store, run_id).wait(timeout=30) == 0
    store.refresh()
    assert _state(store, run_id) == ("completed", "completed")


def test_a_worker_dying_before_its_first_status_is_interrupted_with_its_log(store, run_id):
    folder = store.folder(run_id).path
    (folder / "exit.now").touch()
    with open(folder / "worker.log", "w") as log:
        log.write("ImportError: the last line of a worker that could not start\n")
    store.start(run_id)
    assert _worker(store, run_id).wait(timeout=30) == 3
    store.refresh()
    row = store.get(run_id)
    assert row.state == "interrupted"
    assert "could not start" in row.error


def test_only_the_lock_holder_trains_a_run(store, run_id, capsys):
    """A worker or CLI started on a run whose lock is held refuses, and writes nothing."""
    folder = store.folder(run_id)
    holder = RunLock.claim(folder.path)
    before = folder.status_path.read_bytes()
    with pytest.raises(RunBusy, match="already being trained"):
        RunLock.claim(folder.path)
    assert run_worker(folder.path) == 2
    assert "already being trained" in capsys.readouterr().err
    assert folder.status_path.read_bytes() == before
    holder.close()
    RunLock.claim(folder.path).close()  # free again


def test_a_finished_worker_is_reaped_at_once_not_left_defunct(store, run_id):
    """Finished workers stayed `<defunct>` until the app started another process or exited."""
    import psutil

    gate = Release(store.folder(run_id).path)
    store.start(run_id)
    pid = _worker(store, run_id).pid  # the fixture keeps the Popen, as the app's store would
    gate.release()  # the worker writes "completed" and exits
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            break  # exited and reaped: its pid is gone
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker {pid} is still there 10 s after release: {status}")
    store.refresh()
    assert _state(store, run_id) == ("completed", "completed")


# --- device locks: one per GPU --------------------------------------------------------------


@pytest.fixture
def four_gpus(monkeypatch, tmp_path):
    """A machine with four GPUs, as far as the device locks can tell, and its locks folder."""
    from prefixlab.runs import locks

    monkeypatch.setattr(locks, "cuda_device_count", lambda: 4)
    folder = tmp_path / "locks"
    folder.mkdir()
    return folder


def _hold(folder: Path, name: str):
    f = open(folder / name, "w")  # noqa: SIM115 - closed by the test
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_a_run_on_cuda_takes_the_first_free_gpu_and_a_named_one_waits_for_it(four_gpus):
    import torch

    from prefixlab.runs.locks import device_choices, try_device

    cuda = torch.device("cuda")
    held = [_hold(four_gpus, "cuda-0.lock"), _hold(four_gpus, "cuda-1.lock")]
    device, files = try_device(four_gpus, device_choices(cuda))
    assert device == torch.device("cuda", 2) and [Path(f.name).name for f in files] == [
        "cuda-2.lock"]
    second, more = try_device(four_gpus, device_choices(cuda))
    assert second == torch.device("cuda", 3)  # the first run still holds GPU 2
    assert try_device(four_gpus, device_choices(cuda)) is None  # all four busy: queue
    assert try_device(four_gpus, device_choices(torch.device("cuda:1"))) is None
    held[1].close()  # GPU 1 is free again: the run that named it, and any other, gets it
    assert try_device(four_gpus, device_choices(torch.device("cuda:1")))[0] == torch.device(
        "cuda", 1)
    with pytest.raises(LaunchError, match="names GPU 4; this machine has 4"):
        device_choices(torch.device("cuda:4"))
    # The CPU keeps a lock of its own, free whatever the GPUs do.
    cpu, cpu_files = try_device(four_gpus, device_choices(torch.device("cpu")))
    assert cpu == torch.device("cpu") and Path(cpu_files[0].name).name == "cpu.lock"
    for f in [held[0], *files, *more, *cpu_files]:
        f.close()


def test_ranks_take_gpus_zero_to_n_together_or_wait(four_gpus):
    import torch

    from prefixlab.runs.locks import device_choices, try_device

    ranks = device_choices(torch.device("cuda"), processes=2)
    one = _hold(four_gpus, "cuda-1.lock")
    assert try_device(four_gpus, ranks) is None
    free = _hold(four_gpus, "cuda-0.lock")  # not left half-taken while it waited
    free.close()
    one.close()
    device, files = try_device(four_gpus, ranks)
    assert device == torch.device("cuda") and len(files) == 2
    for f in files:
        f.close()


def test_a_queued_worker_takes_the_gpu_that_frees_first(four_gpus, tmp_path):
    """The worker's wait: every GPU busy, it says it waits; GPU 3 frees and it takes GPU 3."""
    import torch

    from prefixlab.runs import worker
    from prefixlab.runs.locks import device_choices

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    held = [_hold(four_gpus, f"cuda-{i}.lock") for i in range(4)]
    got = {}
    thread = threading.Thread(target=lambda: got.update(taken=worker._wait_for_device(
        folder, four_gpus, device_choices(torch.device("cuda")), folder.path / "cancel")))
    thread.start()
    end = time.time() + 10
    while folder.status().get("state") != "queued" and time.time() < end:
        time.sleep(0.05)
    assert folder.status()["phase"].startswith("waiting for the device (cuda:0 or cuda:1")
    held[3].close()
    thread.join(timeout=10)
    device, files = got["taken"]
    assert device == torch.device("cuda", 3)
    for f in [*held[:3], *files]:
        f.close()
