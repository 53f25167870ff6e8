"""A run folder: the files of one run, read and written atomically.

Layout (safetensors for tensors, JSON for everything else, never pickle):
    config.json              RunConfig + labels, template, base model, data summary
    status.json              state (created/queued/running/completed/failed/cancelled/
                             interrupted), written only by the holder of run.lock
    run.lock, claim.lock     empty lock files: a live worker holds run.lock (see locks.py)
    cancel.request           present while someone asks the run's worker to stop
    prefix.safetensors       folded key/values (L, 2, H_kv, P, D) for inference and export
    prefix_params.safetensors the full parameterization (MLP included), for resume/inspection
    checkpoint.safetensors   prefix parameters + AdamW moments; its metadata holds the step
    metrics.jsonl            append-only: one JSON object per step / evaluation / event
    snapshots/step_N.safetensors  the prefix during training (a few hundred KB each): at each
                             checkpoint and at each evaluation
    report.json              the final evaluation with baselines, the kept step and why
                             training stopped
    kept.json                a cancelled run's prefix that its user chose to use (written by
                             the app, not the worker): the prefix file it keeps, by mtime
    worker.log               the worker process's output (see registry.py)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefixlab.engine.train import Checkpoint
from prefixlab.errors import PrefixLabError
from prefixlab.files import atomic_save_tensors, atomic_write_json, read_json
from prefixlab.runs.config import RunConfig

CANCEL_FILE = "cancel.request"  # its presence asks the run's worker to stop
KEPT_FILE = "kept.json"  # a cancelled run's prefix kept for use (see RunFolder.keep_prefix)
STATES = ("created", "queued", "running", "completed", "failed", "cancelled", "interrupted")


class RunError(PrefixLabError, RuntimeError):
    """A run folder that cannot be used as asked."""


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


class RunFolder:
    """Reads and writes the files of one run; every write is atomic."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    prefix_path = property(lambda self: self.path / "prefix.safetensors")
    params_path = property(lambda self: self.path / "prefix_params.safetensors")
    checkpoint_path = property(lambda self: self.path / "checkpoint.safetensors")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    report_path = property(lambda self: self.path / "report.json")
    snapshots_dir = property(lambda self: self.path / "snapshots")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path} is not a PrefixLab run folder (no config.json)")
        return read_json(self.config_path)

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.read_config()["run"])

    def write_config(self, info: dict) -> None:
        atomic_write_json(self.config_path, info)

    def status(self) -> dict:
        if not self.status_path.is_file():
            return {"state": "created"}
        try:
            return read_json(self.status_path)
        except ValueError:
            return {"state": "interrupted", "error": "status.json was unreadable"}

    def set_status(self, state: str, **extra) -> None:
        """Record the run's state with the writing process's pid and start time.

        Only the holder of the run's lock writes this (locks.RunLock: the worker, a CLI
        training, or the app while it holds a free lock); whether a worker lives is told by
        that lock, not by the pid."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        atomic_write_json(self.status_path, {
            "state": state, "updated": time.time(), "pid": os.getpid(),
            "pid_started": _process_started(), **extra,
        })

    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).is_file()

    def keep_prefix(self) -> None:
        """Keep a cancelled run's prefix for use: it is then served and offered like a
        completed run's. The mark names the prefix file as it is now (its mtime), so a prefix
        written later (a resumed run cancelled again) is not kept without being asked."""
        state = self.status().get("state", "created")
        if state != "cancelled":
            raise RunError(f"run {self.path.name} is {state}: only a cancelled run's prefix is "
                           "kept (a completed run's is used as it is)")
        if not self.prefix_path.is_file():
            if (self.path / "trials").is_dir():  # runs/trials.py: no rate chosen yet
                raise RunError(f"run {self.path.name} was cancelled while it tried learning "
                               "rates, before it chose one: resume it to finish the choice")
            raise RunError(f"run {self.path.name} was cancelled before its first checkpoint: "
                           "it has no prefix to keep")
        atomic_write_json(self.path / KEPT_FILE, {
            "kept": time.time(), "prefix_mtime_ns": self.prefix_path.stat().st_mtime_ns})

    def kept(self) -> bool:
        """Whether the prefix file now in the folder is one its user kept (keep_prefix)."""
        path = self.path / KEPT_FILE
        if not (path.is_file() and self.prefix_path.is_file()):
            return False
        try:
            mark = read_json(path)
        except ValueError:
            return False
        return mark.get("prefix_mtime_ns") == self.prefix_path.stat().st_mtime_ns

    def append_metrics(self, record: dict) -> None:
        """One JSON line per event; a reader may see a partial last line and skip it."""
        line = json.dumps(record, default=float) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def read_metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        """Records appended since byte `offset`, and the offset to read from next time."""
        if not self.metrics_path.is_file():
            return [], offset
        with open(self.metrics_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records, offset + end

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        atomic_save_tensors(self.checkpoint_path, ckpt.tensors(),
                            {"step": str(ckpt.step), "elapsed_s": repr(ckpt.elapsed_s),
                             "planned_steps": str(ckpt.planned_steps)})
        atomic_save_tensors(self.params_path, ckpt.prefix_state)

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.checkpoint_path), framework="pt") as f:
                meta = f.metadata() or {}
            step, elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
            planned = int(meta.get("planned_steps", 0))
            tensors = load_file(str(self.checkpoint_path))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise RunError(f"checkpoint in {self.path} is unreadable: {e}") from e
        return Checkpoint.from_tensors(step, tensors, elapsed, planned)

    def save_snapshot(self, step: int, kv: torch.Tensor) -> None:
        atomic_save_tensors(self.snapshots_dir / f"step_{step:06d}.safetensors",
                            {"key_values": kv})

    def load_snapshot(self, step: int) -> torch.Tensor:
        path = self.snapshots_dir / f"step_{step:06d}.safetensors"
        try:
            return load_file(str(path))["key_values"]
        except (SafetensorError, OSError, KeyError) as e:
            raise RunError(f"snapshot of step {step} in {self.path} is unreadable: {e}") from e

    def snapshots(self) -> list[tuple[int, Path]]:
        if not self.snapshots_dir.is_dir():
            return []
        found = []
        for p in self.snapshots_dir.glob("step_*.safetensors"):
            try:
                found.append((int(p.stem[5:]), p))
            except ValueError:
                continue
        return sorted(found)

    def write_report(self, report: dict) -> None:
        atomic_write_json(self.report_path, report)

    def read_report(self) -> dict | None:
        return read_json(self.report_path) if self.report_path.is_file() else None

    def progress(self) -> tuple[int, int]:
        """The last step and total steps written to the metrics log (reads only its tail)."""
        if not self.metrics_path.is_file():
            return 0, 0
        with open(self.metrics_path, "rb") as f:
            f.seek(max(0, self.metrics_path.stat().st_size - 8192))
            tail = f.read().splitlines()
        for line in reversed(tail):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") == "trial":  # a learning-rate trial's (trials.py)
                record = record["record"]
            if record.get("type") == "step":
                return int(record["step"]), int(record["total_steps"])
        return 0, 0
