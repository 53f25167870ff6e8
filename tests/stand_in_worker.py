"""A stand-in for `python -m prefixlab worker`, for lifecycle tests that need no training.

Called as RunStore.start calls the worker: `stand_in_worker.py RUN_DIR --lock-fd N [--resume]`.
It checks that descriptor N holds the run lock, writes status "running", waits until the test
lets it go (the test holds `release.lock` exclusively; this blocks on a shared lock on it, so
nothing sleeps or polls), then writes status "completed" and exits. With `exit.now` present in
the run folder it exits at once without writing anything (a worker that dies while starting).
Imports only the standard library: it starts in a few milliseconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path


def write_status(run: Path, state: str) -> None:
    tmp = run / f".status.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"state": state, "updated": time.time(), "pid": os.getpid()}))
    os.replace(tmp, run / "status.json")  # atomic, as RunFolder.set_status


def main(argv: list[str]) -> int:
    run = Path(argv[0])
    fd = int(argv[argv.index("--lock-fd") + 1])
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises unless this description holds it
    if (run / "exit.now").exists():
        return 3
    write_status(run, "running")
    with open(run / "release.lock") as release:
        fcntl.flock(release, fcntl.LOCK_SH)  # blocks until the test closes its exclusive lock
    write_status(run, "completed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
