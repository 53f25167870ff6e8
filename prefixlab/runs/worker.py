"""The worker process that trains one run: `python -m prefixlab worker RUN_DIR`.

RunStore.start (registry.py) starts it without a shell, in a new session so closing the app
or the browser does not stop it, and hands it the run lock (locks.py) as an inherited
descriptor. The worker holds that lock for its whole life, queues on per-device lock files
(one run trains at a time per device: the CPU, or each GPU, a run on `cuda` taking the first
free one; locks.device_choices), trains, and reports only through its run folder
(status.json, metrics.jsonl); the registry reads those. With `nproc` > 1 it starts the ranks
through torch's launcher and writes on their behalf when one fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from prefixlab.engine import distributed
from prefixlab.engine.train import TrainingOutOfMemory
from prefixlab.runs.experiment import execute_run
from prefixlab.runs.folder import CANCEL_FILE, RunError, RunFolder
from prefixlab.runs.locks import RunLock, device_choices, try_device

DEVICE_POLL_S = 0.25  # how often a queued worker looks at the device lock and for a cancel


def run_worker(run_dir: str | Path, resume: bool = False, lock_fd: int | None = None) -> int:
    """Body of a worker process: hold the run lock, wait for the device, train, record the
    outcome. `lock_fd` is the run lock handed down by RunStore.start; without it the worker
    takes the lock itself (and refuses to run while another process holds it)."""
    folder = RunFolder(run_dir)
    try:
        lock = (RunLock.adopt(folder.path, lock_fd) if lock_fd is not None
                else RunLock.claim(folder.path))
    except RunError as e:  # not ours to write: another process owns this run
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    with lock:
        return _work(folder, resume)


def _work(folder: RunFolder, resume: bool) -> int:
    """Train the run once the device is free, and leave a final status whatever happens."""
    from prefixlab.engine.models import load_model, pick_device

    try:
        cfg = folder.run_config()
        device = pick_device(cfg.device)
        locks = Path(os.environ.get("PREFIXLAB_DATA_DIR", folder.path.parent.parent)) / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        cancel = folder.path / CANCEL_FILE
        processes = distributed.process_count(cfg.nproc, device)
        taken = _wait_for_device(folder, locks, device_choices(device, processes), cancel)
        if taken is None or cancel.exists():
            _release(taken)
            folder.set_status("cancelled")
            return 0
        device, held = taken
        with contextlib.ExitStack() as stack:
            for f in held:
                stack.enter_context(f)
            folder.set_status("running", phase="loading the model", processes=processes)
            if processes > 1:
                return launch_ranks(folder, processes, resume)
            loaded = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                                precision=cfg.precision)
            report = execute_run(folder, loaded, resume=resume, should_stop=cancel.exists)
            if report is None:
                folder.set_status("cancelled", step=folder.progress()[0])
        return 0
    except distributed.LaunchError as e:
        folder.set_status("failed", error=str(e))
        return 1
    except TrainingOutOfMemory as e:  # checkpointed at e.step: resuming continues there
        folder.set_status("failed", error=str(e), step=e.step)
        return 1
    except (torch.OutOfMemoryError, MemoryError) as e:  # outside a training step
        traceback.print_exc()
        folder.set_status("failed", error=f"out of memory ({type(e).__name__}): lower the "
                          "batch size or the max length, or use a model held in a smaller "
                          "dtype")
        return 1
    except Exception as e:  # the worker's last word: record why, keep the traceback in its log
        traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        with contextlib.suppress(OSError):
            folder.set_status("failed", error=f"{type(e).__name__}: {message}")
        return 1


def _wait_for_device(folder: RunFolder, locks: Path, choices, cancel: Path):
    """Take the lock files of the first free choice (locks.device_choices) and return (the
    device to train on, the open lock files), or None when the run is cancelled while it
    waits. The OS releases the locks if the worker is killed.

    Polled rather than blocking, so a queued run is cancelled at once instead of after the
    run ahead of it, and takes whichever GPU frees first; "waiting" is said only when
    someone holds the device.
    """
    waiting = False
    while (taken := try_device(locks, choices)) is None:
        if cancel.exists():
            return None
        if not waiting:
            what = " or ".join(str(d) for d, _ in choices)
            folder.set_status("queued", phase=f"waiting for the device ({what}): another "
                              "run is training")
            waiting = True
        time.sleep(DEVICE_POLL_S)
    return taken


def _release(taken) -> None:
    if taken is not None:
        for f in taken[1]:
            f.close()


def launch_ranks(folder: RunFolder, processes: int, resume: bool) -> int:
    """Train on `processes` ranks started by torch's launcher in this process, which holds
    the run lock: rank 0 writes the run's progress on its behalf (one writer at a time);
    when a rank dies the launcher stops the others and this process records which one and
    how."""
    try:
        distributed.launch(["rank", str(folder.path), *(["--resume"] if resume else [])],
                           processes)
    except distributed.WorkerFailed as e:
        folder.set_status("interrupted" if e.killed else "failed", error=str(e),
                          step=folder.progress()[0], processes=processes)
        return 1
    return 0
