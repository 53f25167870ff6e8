"""Data-parallel training across processes that torch's elastic launcher (torchrun) starts.

Each rank holds the frozen model and a copy of the prefix. Every rank computes the same
length-bucketed global batch (a pure function of seed and epoch) and takes a contiguous share
of it (`share`); its chunks' losses are weighted by their label tokens over the *global*
batch's, so the ranks' gradients add up to the one-process batch gradient, even when a share
is uneven or empty. One all_reduce per step (`reduce_step`) sums those gradients together
with the loss and token counts; every rank then clips and steps identically, so the prefixes
stay equal and the learning-rate schedule is the one-process schedule.

Why an explicit all_reduce and not DistributedDataParallel: the trainable state is one small
module (the prefix, a few hundred KB), whose gradient the lean CPU step produces directly,
after a batch read in several chunks. DDP would need `no_sync` around all chunks but the last,
hooks on a module whose forward it does not run, and `find_unused_parameters` for a rank whose
share of a small last batch is empty; its overlap of communication with backward buys nothing
for one bucket of this size. The all_reduce is torch's (gloo on CPU, NCCL on CUDA); the
processes are started by torch's launcher (`launch` calls `torch.distributed.run`).

Outside a process group every helper is the one-process identity, so the training loop calls
them unconditionally.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from prefixlab.errors import PrefixLabError

T = TypeVar("T")

MAX_PROCESSES = 256


class LaunchError(PrefixLabError):
    """A setting of processes and devices that cannot run, said before anything starts."""


class WorkerFailed(PrefixLabError, RuntimeError):
    """A rank of a data-parallel job died or failed; the others were stopped.

    `message` reads "worker 1 of 2 died: killed by SIGKILL"; `killed` is True when a signal
    ended it (the run can be resumed from its last checkpoint), False for an error.
    """

    def __init__(self, message: str, killed: bool) -> None:
        super().__init__(message)
        self.killed = killed


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a job torchrun started (its environment variables)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or None in a process it did not start."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_RANK", 0)))


# --- processes and devices ------------------------------------------------------------------


def process_count(requested: int | None, device: torch.device) -> int:
    """How many ranks a run on `device` uses: `requested`, or by default one per CUDA device
    (all of them) and one on CPU, where a second process only pays when cores are idle."""
    if requested is not None and not 1 <= requested <= MAX_PROCESSES:
        raise LaunchError(f"processes must be 1..{MAX_PROCESSES}, got {requested}")
    if device.type != "cuda":
        return requested or 1
    available = torch.cuda.device_count()
    if requested is None:  # every GPU, unless the device names one
        return 1 if device.index is not None else max(1, available)
    if requested > 1 and device.index is not None:
        raise LaunchError(f"device {device} names one GPU, and {requested} processes need one "
                          f"GPU each: set the device to 'cuda' to use GPUs 0..{requested - 1}")
    if requested > available:
        raise LaunchError(f"{requested} processes need {requested} GPUs (one per process); "
                          f"this machine has {available}")
    return requested


def rank_device(requested: str | None, ranks: Ranks) -> torch.device:
    """This rank's device: the GPU numbered by its local rank on CUDA, else the CPU."""
    from prefixlab.engine.models import pick_device

    device = pick_device(requested)
    if device.type != "cuda":
        return device
    if ranks.world_size > 1 and device.index not in (None, ranks.local_rank):
        raise LaunchError(f"device {device} names one GPU; with {ranks.world_size} processes "
                          "each takes the GPU of its local rank: set the device to 'cuda'")
    if ranks.local_rank >= torch.cuda.device_count():
        raise LaunchError(f"local rank {ranks.local_rank} has no GPU of its own: this machine "
                          f"has {torch.cuda.device_count()}; start at most that many per node")
    return torch.device("cuda", ranks.local_rank)


def start(device: torch.device) -> None:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on CPU.

    Also ends this process when its launcher dies: torch's launcher starts each rank in a
    session of its own, so a launcher killed with SIGKILL would otherwise leave ranks training
    (and rank 0 writing) with no one to report to.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _exit_with_parent()


def stop() -> None:
    """Leave the process group (the identity outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_with_parent(interval_s: float = 0.5) -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)  # the launcher is gone: no one would stop or report this rank

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


# --- who am I -----------------------------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_writer() -> bool:
    """True on the one process that writes a run's files (rank 0)."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: the rank's GPU under NCCL, else the CPU."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _active():
        dist.barrier()


# --- what each rank computes ----------------------------------------------------------------


def share(rows: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous share of a global batch: ranks hold len(rows)/world rows each,
    the later ones one more when it does not divide (a share may be empty). A bucketed batch
    is sorted by length, so each share is nearly pad-free too."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(rows)
    return list(rows[r * n // w : (r + 1) * n // w])


def reduce_step(params: Sequence[nn.Parameter], *scalars: float) -> list[float]:
    """Sum the ranks' gradients of `params` (in place) and `scalars` in one all_reduce.

    A parameter without a gradient (this rank's share was empty) counts as zeros. Returns
    the summed scalars; the identity in one process.
    """
    if not _active():
        return list(scalars)
    device = _comm_device()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads]
                     + [torch.tensor(scalars, dtype=torch.float32, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.device, g.dtype)
        offset += n
    return flat[offset:].tolist()


def broadcast_parameters(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters (after initialization or a resume), so ranks start
    from bit-identical prefixes however their initialization ran."""
    if not _active():
        return
    device = _comm_device()
    for p in module.parameters():
        data = p.data.to(device)
        dist.broadcast(data, src=0)
        p.data.copy_(data)


def agree(flag: bool) -> bool:
    """True on every rank when it is true on any: a stop request one rank sees (a cancel file
    read between two steps) must stop all of them at the same step, or the others would wait
    in the next all_reduce forever."""
    if not _active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def agree_min(value: float) -> float:
    """The smallest of the ranks' values, on every rank: each rank's clock plans its own
    schedule length, and they must run the same one."""
    if not _active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.item()


def agreed(check: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """`check`, asked on every rank and agreed on (`agree`); None stays None."""
    if check is None or not _active():
        return check
    return lambda: agree(check())


def gather_rows(compute: Callable[[Sequence[T]], np.ndarray], items: Sequence[T]) -> np.ndarray:
    """compute(items) with the items split across ranks: each rank computes its contiguous
    share, and every rank gets all rows back in the items' order. `compute` returns one row
    per item, (n, ...) float64."""
    if not _active() or world_size() == 1:
        return compute(items)
    mine = np.asarray(compute(share(items)), dtype=np.float64)
    device = _comm_device()
    world = world_size()
    counts = [share(items, r, world) for r in range(world)]
    width = max(len(c) for c in counts)
    tail = tuple(mine.shape[1:]) if mine.ndim > 1 else ()
    padded = torch.zeros((width, *tail), dtype=torch.float64, device=device)
    padded[: len(mine)] = torch.from_numpy(mine).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [part[: len(c)].cpu().numpy() for part, c in zip(parts, counts, strict=True)]
    return np.concatenate(rows, axis=0)


# --- launching ------------------------------------------------------------------------------


def launch(prefixlab_args: Sequence[str], processes: int,
           launcher_args: Sequence[str] = ()) -> None:
    """Run `python -m prefixlab <prefixlab_args>` on `processes` ranks of this machine through
    torch's elastic launcher (`torch.distributed.run`, what `torchrun` runs), and wait.

    `launcher_args` are torchrun's own options (e.g. --nnodes, --rdzv-endpoint). Each rank gets
    an equal share of this machine's cores unless OMP_NUM_THREADS says otherwise. Raises
    WorkerFailed when a rank dies or fails; the launcher then stops the others at once.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "OMP_NUM_THREADS" not in os.environ:  # ranks x threads = cores, not cores^2
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // processes))
    args = torchrun.parse_args([*launcher_args, "--nproc-per-node", str(processes),
                                "--module", "prefixlab", *prefixlab_args])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        raise failure_of(e.failures, processes * _node_count(args.nnodes)) from None
    except SignalException as e:  # the launcher itself was stopped; it stopped the ranks
        raise WorkerFailed(f"the launcher was stopped by {e.sigval.name}; so were its "
                           f"{processes} workers", killed=True) from None


def _node_count(nnodes: str) -> int:
    return int(str(nnodes).split(":")[-1])


def failure_of(failures: dict, world: int) -> WorkerFailed:
    """A readable WorkerFailed from torch elastic's failures ({global rank: ProcessFailure}).

    The launcher lists every rank that ended badly, the ones it stopped (SIGTERM) and those
    that failed for want of a dead peer included; the cause named is the first of: a rank
    killed by another signal, a rank's own error, an error about its peers, a SIGTERM.
    """
    def cause(item):
        rank_, failure = item
        text = _message(failure)
        if failure.exitcode < 0:
            kind = 3 if -failure.exitcode == signal.SIGTERM else 0
        else:
            kind = 2 if any(word in text for word in _PEER_ERRORS) else 1
        return (kind, failure.timestamp, rank_)

    rank_, failure = min(failures.items(), key=cause)
    who = f"worker {rank_} of {world}"
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return WorkerFailed(f"{who} died: killed by {name}", killed=True)
    text = _message(failure) or f"exit code {failure.exitcode}"
    return WorkerFailed(f"{who} failed: {text[:300]}", killed=False)


_PEER_ERRORS = ("DistBackendError", "Connection closed by peer", "Connection reset by peer",
                "NCCL error", "Broken pipe")
"""Words of the errors a rank raises when another rank died under a collective."""


def _message(failure) -> str:
    """The first line of a rank's error, from the file its @record handler wrote."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = " ".join(str(message or "").split())
    return "" if text.startswith("To enable traceback") else text
