"""The run registry: one SQLite database (WAL) of the runs in a data directory.

A data directory holds `registry.sqlite3`, `runs/<run id>/` folders (folder.py) and `locks/`
(one lock file per device, on which workers queue). RunStore creates runs, starts each in its
own worker process (worker.py, started by command, never imported here), cancels, kills and
deletes them. A worker reports only through its run folder; `RunStore.refresh` folds that
into the registry and marks runs whose worker died as interrupted, so nothing shows
"running" forever.

A worker is alive exactly while it holds its run's lock (locks.py). A refresh that finds the
lock free takes it, re-reads the status, and only then marks a run that still says
queued/running as interrupted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from prefixlab.engine.models import LoadedModel, ModelInfo
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import PreparedData, create_run, prepare_data
from prefixlab.runs.extension import extend_run
from prefixlab.runs.folder import CANCEL_FILE, RunError, RunFolder
from prefixlab.runs.locks import RunBusy, claim_lock, try_run_lock

ACTIVE = ("queued", "running")
FINISHED = ("completed", "failed", "cancelled", "interrupted")
# A run id is its folder's name: the app's own are YYYYMMDD-HHMMSS-slug, and a folder the CLI
# wrote into runs/ (`train --output D/runs/sentiment`) is served under its name too. One
# path component, never hidden, never a traversal.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    data_name TEXT NOT NULL,
    model TEXT NOT NULL,
    pid INTEGER,
    pid_started REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    accuracy REAL,
    macro_f1 REAL,
    error TEXT
)
"""


def slugify(name: str) -> str:
    """A safe folder-name part: lowercase ASCII letters, digits and dashes, at most 40."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:40].strip("-") or "run"


@dataclass
class RunRow:
    id: str
    name: str
    state: str
    created: float
    updated: float
    data_name: str
    model: str
    pid: int | None
    pid_started: float | None
    step: int
    total_steps: int
    accuracy: float | None
    macro_f1: float | None
    error: str | None


class RunStore:
    """Runs of one data directory: registry rows plus run folders."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.runs_dir = self.data_dir / "runs"
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "locks").mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"the data directory {self.data_dir} is not writable: {e}") from e
        self.db_path = self.data_dir / "registry.sqlite3"
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
        # The worker program; it is called with the run folder, `--lock-fd N` and maybe
        # `--resume`, and must keep descriptor N open for as long as it may write the run.
        self.worker_command = [sys.executable, "-m", "prefixlab", "worker"]
        # The workers this store started, by pid: each is waited for as it ends (so none
        # stays a zombie), and its exit code is kept here.
        self.workers: dict[int, subprocess.Popen] = {}

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    # --- lookup ------------------------------------------------------------------------------

    def folder(self, run_id: str) -> RunFolder:
        """The folder of a run id; ids are ours, so anything else is refused (no traversal)."""
        if not _ID.match(run_id or ""):
            raise RunError(f"not a run id: {run_id!r}")
        return RunFolder(self.runs_dir / run_id)

    def get(self, run_id: str) -> RunRow:
        self.folder(run_id)  # RunError for anything that is not a run id (odd text included)
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunError(f"no run {run_id!r} in {self.data_dir}")
        return RunRow(**dict(row))

    def list(self) -> list[RunRow]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
        return [RunRow(**dict(r)) for r in rows]

    def active(self) -> list[RunRow]:
        return [r for r in self.list() if r.state in ACTIVE]

    # --- lifecycle ---------------------------------------------------------------------------

    def create(
        self, cfg: RunConfig, loaded: LoadedModel | ModelInfo, name: str | None = None,
        data_name: str | None = None, prepared: PreparedData | None = None,
    ) -> str:
        """Validate the data, copy it into a new run folder and register the run.

        `prepared`: the data as the caller already read and checked it from `cfg`, so the CSV
        is parsed once per start. Raises DataError (nothing is written) when the data cannot
        be used.
        """
        if prepared is None:
            prepared = prepare_data(cfg)
        label = name or Path(cfg.train_csv).stem
        data_name = data_name or Path(cfg.train_csv).name  # before it points at our copy
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{slugify(label)}"
        n = 1
        while (self.runs_dir / run_id).exists():
            n += 1
            run_id = f"{stamp}-{slugify(label)[:36]}-{n}"
        folder = RunFolder(self.runs_dir / run_id)
        data_dir = folder.path / "data"
        try:
            data_dir.mkdir(parents=True)
            # The run keeps its own copy: uploads live in temp folders that get cleaned up.
            train_copy = data_dir / "train.csv"
            shutil.copyfile(cfg.train_csv, train_copy)
            cfg.train_csv = str(train_copy)
            if cfg.validation_csv:
                val_copy = data_dir / "validation.csv"
                shutil.copyfile(cfg.validation_csv, val_copy)
                cfg.validation_csv = str(val_copy)
            if cfg.shift_csv:  # read again by the final report, maybe after a restart
                shift_copy = data_dir / "shift.csv"
                shutil.copyfile(cfg.shift_csv, shift_copy)
                cfg.shift_csv = str(shift_copy)
            create_run(cfg, folder.path, prepared, loaded, name=label)
        except OSError as e:
            shutil.rmtree(folder.path, ignore_errors=True)
            raise RunError(f"could not write the run folder in {self.data_dir}: {e}") from e
        now = time.time()
        with self._db() as db:
            # A refresh in another process may have adopted the new folder already.
            db.execute(
                "INSERT INTO runs (id, name, state, created, updated, data_name, model) "
                "VALUES (?, ?, 'created', ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "name=excluded.name, data_name=excluded.data_name, model=excluded.model",
                (run_id, label, now, now, data_name, loaded.name),
            )
        return run_id

    def start(self, run_id: str, resume: bool = False) -> None:
        """Start the run's worker process; it queues until the device is free.

        Raises RunBusy when the run already has a live worker: of two quick clicks on
        Resume, one starts the worker and the other gets that message.
        """
        with self._run_lock(run_id) as (folder, fd):
            self._launch(run_id, folder, fd, resume)

    def train_longer(self, run_id: str, more_minutes: float, more_epochs: int) -> dict:
        """Give a completed run that ended on its budget more minutes and/or epochs, and
        start its worker to resume it from its checkpoint (extension.py). Returns the
        extension; of two quick clicks, one extends and starts, the other gets RunBusy."""
        with self._run_lock(run_id) as (folder, fd):
            extension = extend_run(folder, more_minutes, more_epochs)
            self._launch(run_id, folder, fd, resume=True)
        return extension

    @contextlib.contextmanager
    def _run_lock(self, run_id: str) -> Iterator[tuple[RunFolder, int]]:
        """The run's folder and its lock's descriptor, held here (RunBusy when a worker
        holds it); closed on the way out, where a started worker's inherited copy keeps it."""
        row = self.get(run_id)
        folder = self.folder(run_id)
        with claim_lock(folder.path):
            fd = try_run_lock(folder.path)
            if fd is None:
                raise RunBusy(f"run {row.name!r} is already queued or running; cancel it "
                              "before starting it again")
            try:
                yield folder, fd
            finally:
                os.close(fd)  # the worker's inherited copy holds the lock from here on

    def _launch(self, run_id: str, folder: RunFolder, fd: int, resume: bool) -> None:
        """Start the worker, handing it the run lock `fd` that the caller holds."""
        # We hold the lock, so these writes are the run's only ones; "queued" stands
        # until the worker writes its own status, and if the worker dies before that,
        # the next refresh finds the lock free and the run still queued: interrupted.
        (folder.path / CANCEL_FILE).unlink(missing_ok=True)
        folder.set_status("queued", pid=None, pid_started=None, phase="starting the worker")
        proc = self._spawn(folder, fd, resume)
        self.workers[proc.pid] = proc
        _reap_when_done(proc)
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:  # already gone: the next refresh says why
            started = None
        with self._db() as db:
            db.execute(
                "UPDATE runs SET state='queued', pid=?, pid_started=?, updated=?, "
                "error=NULL WHERE id=?", (proc.pid, started, time.time(), run_id),
            )

    def _spawn(self, folder: RunFolder, fd: int, resume: bool) -> subprocess.Popen:
        """The worker process, handed the run lock as descriptor `fd` (the same number)."""
        cmd = [*self.worker_command, str(folder.path), "--lock-fd", str(fd)]
        if resume:
            cmd.append("--resume")
        log = open(folder.path / "worker.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(self.data_dir), pass_fds=(fd,),
                env=_worker_env(self.data_dir),
            )
        except OSError as e:
            folder.set_status("failed", error=f"could not start the worker: {e}")
            raise RunError(f"could not start a worker for {folder.path.name}: {e}") from e
        finally:
            log.close()

    def cancel(self, run_id: str) -> None:
        """Ask the worker to stop after its current step; it keeps its last checkpoint."""
        row = self.get(run_id)
        if row.state not in ACTIVE:
            raise RunError(f"run {row.name!r} is {row.state}, not running")
        (self.folder(run_id).path / CANCEL_FILE).write_text("cancel\n")

    def delete(self, run_id: str) -> None:
        row = self.get(run_id)
        path = self.folder(run_id).path
        if not path.is_dir():  # the folder is gone already: forget the row
            with self._db() as db:
                db.execute("DELETE FROM runs WHERE id=?", (run_id,))
            return
        with claim_lock(path):
            fd = try_run_lock(path)
            if fd is None:
                raise RunBusy(f"run {row.name!r} is {row.state}; cancel it before deleting")
            try:  # holding the lock: no worker can start on the folder while it goes
                shutil.rmtree(path, ignore_errors=True)
                with self._db() as db:
                    db.execute("DELETE FROM runs WHERE id=?", (run_id,))
            finally:
                os.close(fd)

    def kill(self, run_id: str) -> None:
        """Stop a worker at once (SIGKILL); the run becomes interrupted on the next refresh."""
        row = self.get(run_id)
        if row.pid and _alive(row.pid, row.pid_started):
            os.kill(row.pid, signal.SIGKILL)

    def refresh(self) -> list[RunRow]:
        """Fold run folders' status into the registry; mark dead workers' runs interrupted.

        Also registers run folders the registry does not know (e.g. after a lost database,
        or one the CLI wrote), and forgets runs whose folders were deleted.
        """
        rows = {r.id: r for r in self.list()}
        for path in sorted(self.runs_dir.iterdir()) if self.runs_dir.is_dir() else []:
            if path.name not in rows and _ID.match(path.name) and RunFolder(path).exists():
                self._adopt(RunFolder(path))
        gone = [run_id for run_id in rows if not (self.runs_dir / run_id).is_dir()]
        if gone:  # deleted on disk, not through the app: no longer a run to list or serve
            with self._db() as db:
                db.executemany("DELETE FROM runs WHERE id=?", [(run_id,) for run_id in gone])
        for row in self.list():
            if row.state in FINISHED and row.state != "interrupted":
                continue
            self._sync(row)
        return self.list()

    def _adopt(self, folder: RunFolder) -> None:
        try:
            info = folder.read_config()
        except (RunError, ValueError):
            return
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (id, name, state, created, updated, data_name, model) "
                "VALUES (?, ?, 'created', ?, ?, ?, ?)",
                (folder.path.name, info.get("name", folder.path.name), info.get("created", now),
                 now, Path(info["run"]["train_csv"]).name, info["run"]["model"]),
            )

    def _sync(self, row: RunRow) -> None:
        """Fold a run's status into the registry; mark it interrupted if its worker is gone.

        Liveness is checked first and the status read after: a worker that writes its last
        status and exits just before the check leaves the lock free and that status on disk,
        which is then read as it is. A free lock is taken before anything is written.
        """
        folder = self.folder(row.id)
        if not folder.path.is_dir():
            return
        with claim_lock(folder.path):
            fd = try_run_lock(folder.path)
            try:
                status = folder.status()
                state = status.get("state", "created")
                error = status.get("error")
                if fd is not None and state in ACTIVE:  # the lock is ours: no worker lives
                    state = "interrupted"
                    error = error or ("the worker process ended without finishing (killed or "
                                      "crashed)")
                    if tail := _log_tail(folder):
                        error += f"; its log ends with: {tail}"
                    folder.set_status("interrupted", error=error, step=folder.progress()[0])
                step, total = folder.progress()
                report = folder.read_report() if state == "completed" else None
                # Under the claim lock, so no start of this run lands between the read
                # above and this write (a finished state written over a new start's
                # "queued" would never be refreshed again).
                with self._db() as db:
                    db.execute(
                        "UPDATE runs SET state=?, updated=?, step=?, total_steps=?, "
                        "accuracy=?, macro_f1=?, error=? WHERE id=?",
                        (state, time.time(), step, total,
                         # a generation run's report has no accuracy or macro-F1
                         report and report.get("accuracy"), report and report.get("macro_f1"),
                         error, row.id),
                    )
            finally:
                if fd is not None:
                    os.close(fd)


def _reap_when_done(proc: subprocess.Popen) -> None:
    """Wait for a worker in a daemon thread, so that it is reaped as soon as it exits.

    The worker is this process's child: until someone waits for it, a finished worker stays a
    zombie (`<defunct>`), which Python only reaps at its next Popen, or never in an app that
    starts no other process."""
    threading.Thread(target=proc.wait, name=f"reap-worker-{proc.pid}", daemon=True).start()


def _worker_env(data_dir: Path) -> dict[str, str]:
    """The app's environment, with this package importable from the worker's folder."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
            "PREFIXLAB_DATA_DIR": str(data_dir)}


def _log_tail(folder: RunFolder) -> str:
    """The worker log's last line, which says why a worker died before reporting."""
    log = folder.path / "worker.log"
    if not log.is_file():
        return ""
    lines = [x for x in log.read_text(errors="replace").splitlines()[-20:] if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _alive(pid: int | None, started: float | None) -> bool:
    """Is this exact process still running (and not a new one that reused its pid)?"""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
