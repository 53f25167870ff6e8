"""Run locks: one writer per run, and a live worker is one that holds its run's lock.

A run folder's `run.lock` (an flock) is held by its worker for the worker's whole life, and
only the holder of that lock writes status.json. A worker is alive exactly while the lock is
held; the OS releases it when the worker exits or is killed, so there is no pid to compare
and no gap between "read the status" and "check the worker". Starting a worker takes the
lock first (a second start is refused while it is held) and hands it to the child as an
inherited file descriptor, so it is never free in between. Starts and checks of one run pass
through a second, momentary lock (`claim.lock`), so a check looking at a free run lock never
makes a concurrent start fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from prefixlab.runs.folder import RunError

LOCK_FILE = "run.lock"  # held by the run's worker (or a CLI training it) for its whole life
CLAIM_FILE = "claim.lock"  # held for a moment by whoever starts a run or checks its lock


class RunBusy(RunError):
    """The run already has a live worker (or a CLI process training it)."""


def _open_lock(path: Path) -> int:
    # O_CLOEXEC (Python's default): no other child of this process inherits the lock; a
    # worker gets it only through Popen's pass_fds.
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def claim_lock(run_dir: Path) -> Iterator[None]:
    """Serialize starting and checking one run (held for milliseconds, so callers wait)."""
    fd = _open_lock(run_dir / CLAIM_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_run_lock(run_dir: Path) -> int | None:
    """The run lock's file descriptor if it was free and is now ours, else None (held).

    flock locks belong to an open file description, so two threads of one process
    exclude each other just as two processes do.
    """
    fd = _open_lock(run_dir / LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class RunLock:
    """The lock that makes its holder the run's only writer, held until `close`.

    `close` closes the descriptor and never unlocks explicitly: a worker started with
    `pass_fds` shares the starter's open file description, and the OS keeps the lock until
    the last process holding that description closes it or exits (or is killed).
    """

    def __init__(self, run_dir: str | Path, fd: int) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = fd

    @classmethod
    def claim(cls, run_dir: str | Path) -> RunLock:
        """Take a run's lock, or raise RunBusy when a live process holds it."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(f"{run_dir} is not a run folder")
        with claim_lock(run_dir):
            fd = try_run_lock(run_dir)
        if fd is None:
            raise RunBusy(f"{run_dir.name} is already being trained by another process (its "
                          "run lock is held); cancel that run or wait for it to finish")
        return cls(run_dir, fd)

    @classmethod
    def adopt(cls, run_dir: str | Path, fd: int) -> RunLock:
        """Take over the lock a starter passed down as descriptor `fd` (see RunStore.start)."""
        try:
            # On the description that already holds the lock this succeeds at once; on a
            # stray descriptor it fails rather than letting two writers run.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RunBusy(f"descriptor {fd} does not hold the run lock of {run_dir}: {e}") from e
        os.set_inheritable(fd, False)  # pass_fds made it inheritable; nothing below needs it
        return cls(run_dir, fd)

    def fileno(self) -> int:
        if self._fd is None:
            raise RunError("the run lock was already closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_lock_held(run_dir: str | Path) -> bool:
    """Is a live process (a worker, or a CLI training) holding this run's lock?"""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK_FILE).is_file():
        return False  # never started
    with claim_lock(run_dir):
        fd = try_run_lock(run_dir)
    if fd is None:
        return True
    os.close(fd)
    return False


# --- devices --------------------------------------------------------------------------------
# One run trains at a time per device: a worker holds the lock file of each device it trains
# on (`locks/cpu.lock`, `locks/cuda-0.lock`, `locks/cuda-1.lock`, ...) for its whole life, so
# runs meant for different GPUs of one machine train side by side.


def cuda_device_count() -> int:
    """GPUs torch sees; a function of its own so tests can give a machine several."""
    import torch

    return torch.cuda.device_count()


def device_choices(device, processes: int = 1) -> list[tuple[object, list[str]]]:
    """The ways a run on `device` (a torch.device) with `processes` ranks may hold what it
    trains on: (the device to train on, the lock files it needs), in order of preference.

    cpu: its own lock. A named GPU (`cuda:1`): that GPU's. `cuda` with one process: any one
    GPU, the first free. `cuda` with N processes: GPUs 0..N-1 (rank r trains on GPU r).
    """
    import torch

    if device.type != "cuda":
        return [(device, [f"{device.type}.lock"])]
    if processes > 1:
        return [(torch.device("cuda"), [f"cuda-{i}.lock" for i in range(processes)])]
    if device.index is not None:
        if device.index >= (count := cuda_device_count()):
            from prefixlab.engine.distributed import LaunchError

            raise LaunchError(f"device {device} names GPU {device.index}; this machine has "
                              f"{count} (cuda:0..cuda:{count - 1})")
        return [(device, [f"cuda-{device.index}.lock"])]
    return [(torch.device("cuda", i), [f"cuda-{i}.lock"])
            for i in range(max(1, cuda_device_count()))]


def try_device(locks_dir: Path, choices: list[tuple[object, list[str]]]):
    """The first choice whose lock files are all free, as (device, open lock files, now held
    until closed), or None when every choice has a lock held by another process."""
    for device, names in choices:
        held = []
        for name in names:
            f = open(locks_dir / name, "w")  # noqa: SIM115 - the caller closes it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                break
            held.append(f)
        if len(held) == len(names):
            return device, held
        for f in held:
            f.close()
    return None
