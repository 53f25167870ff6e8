"""Process-wide CPU tuning for training and scoring: thread count, matmul library, heap.

- `ThreadTuner` picks torch's thread count step by step from what each step measures (cores
  shared with other processes make more threads slower, not faster).
- `linear` multiplies through oneDNN where torch has it; importing this module caps oneDNN's
  primitive cache (an environment variable oneDNN reads once). `onednn_inference` makes a
  model's linear layers use it whenever no gradient is recorded (scoring, generation).
- `trim_heap` hands free heap pages back to the OS after a step.

These change the whole process, so they belong to the process that trains or scores in a
loop (the run worker, the benchmark), not to request threads of the app: the app calls
`pin_threads` once at its start, which keeps every tuner in its process inactive.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.engine import precision

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN caches a primitive, with its own packed-weight scratch memory, per matmul shape, up to
# 1024 of them: length-bucketed batches bring a new row count each, and a full cache grows
# peak memory for nothing. 16 holds what one batch uses. Read when oneDNN makes its
# first primitive, so this takes effect unless something ran oneDNN before this import.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x @ weight^T + bias through oneDNN where torch has it (any layout of `weight`: the
    backward passes weight^T as a view). MKL, torch's default, takes its AVX2 path on AMD
    processors, where oneDNN uses AVX-512. Other dtypes (bfloat16) go through torch's own
    matmul: oneDNN's fused linear refuses bf16 on a CPU without AVX-512, and where bf16 is
    native torch's matmul reaches oneDNN by itself."""
    if ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    return F.linear(x, weight, bias)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA with bf16, or a CPU with AVX512-BF16
    or AMX (precision.cpu_isa). Without it (most laptops' AVX2) a CPU runs bf16 matmuls far
    slower than float32; with it, faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and precision.cpu_isa() != "none"


ONEDNN_MIN_ROWS = 8
"""Below this many rows (tokens) torch's default matmul is as fast or faster than oneDNN's
(measured one shape at a time). A decoding step of a few rows stays on MKL."""


class InferenceLinear(nn.Linear):
    """nn.Linear that multiplies through oneDNN (`linear`) when no gradient is recorded on a
    float32 CPU input of at least ONEDNN_MIN_ROWS rows: scoring, evaluation, reading prompts.
    With autograd on (training, maps that need gradients) it is nn.Linear. The result equals
    nn.Linear's up to float rounding (the libraries sum in different orders)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
                or self.weight.dtype != torch.float32
                or x.numel() < ONEDNN_MIN_ROWS * self.in_features):
            return super().forward(x)
        return linear(x, self.weight, self.bias)


def onednn_inference(model: nn.Module, on: bool = True) -> int:
    """Make every plain nn.Linear of `model` an InferenceLinear (on) or plain again (off), in
    place: only the class changes, parameters and state dict stay. Subclasses (a LoRA layer,
    a quantized linear) are left alone. Returns how many layers changed; 0 without oneDNN."""
    if not ONEDNN:
        return 0
    old, new = (nn.Linear, InferenceLinear) if on else (InferenceLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


_pinned: int | None = None  # set once by pin_threads: this process's thread count is fixed


def pin_threads(count: int | None = None) -> int:
    """Fix torch's CPU thread count for the whole process, once, at its start: `count`, or
    torch's default. For a process serving requests on many threads (the app): torch's thread
    count is process-wide, so a tuner in one request thread would change it under another's
    matmuls. Every ThreadTuner made afterwards in this process stays inactive; the worker
    processes that train do not call this and keep tuning. Returns the count."""
    global _pinned
    if count is not None:
        torch.set_num_threads(count)
    _pinned = torch.get_num_threads()
    return _pinned


def _per_thread_controls() -> ctypes.CDLL | None:
    """torch's CPU library, through which OpenMP's and MKL's per-thread counts are set; None
    where it does not export them (a build without OpenMP or MKL)."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        for name in ("omp_set_num_threads", "omp_get_max_threads", "MKL_Set_Num_Threads_Local"):
            getattr(lib, name)
    except (OSError, AttributeError):
        return None
    return lib


_PER_THREAD = _per_thread_controls()


@contextlib.contextmanager
def one_thread_here() -> Iterator[None]:
    """Torch's CPU ops in the calling thread run on one thread; other threads, and the count a
    new thread starts from, stay as they are.

    torch.set_num_threads also sets the process-wide count that each thread adopts at its
    first torch op, so called from a request thread it would leave later requests on one
    thread. This sets only the calling thread's OpenMP and MKL counts, which are per thread,
    after torch's own per-thread set-up has run (which would otherwise undo them). Where torch
    exports neither, the thread keeps its count.
    """
    lib = _PER_THREAD
    if lib is None:
        yield
        return
    torch.get_num_threads()  # torch's per-thread set-up happens at a thread's first call
    omp_before = lib.omp_get_max_threads()
    mkl_before = lib.MKL_Set_Num_Threads_Local(1)  # returns the thread's previous setting
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(omp_before)
        lib.MKL_Set_Num_Threads_Local(mkl_before)


class ThreadTuner:
    """Picks torch's CPU thread count step by step, from what each step measures.

    On cores that other processes also use, every parallel op waits at an OpenMP barrier for
    a thread the scheduler has not run yet, so on shared cores more threads can be far slower
    than one, while on idle cores they are faster. So
    the tuner runs torch's thread count while its threads get the CPU time they ask for, and
    tries one thread for a step when they do not; it runs one thread while no core is idle,
    and tries the full count for a step when one is (from /proc/stat; without it, now and
    then). A try is kept if its step ran faster per padded token. A try that loses waits
    twice as long before the next.

    Inactive (a no-op) on CUDA, with one thread, when OMP_NUM_THREADS pins the count, or in
    a process that called `pin_threads` (the app, whose requests run on many threads).
    """

    BUSY = 0.8  # CPU seconds per wall second per thread below which our threads were starved
    IDLE = 0.3  # share of the machine's CPU time left idle above which a core is free

    def __init__(self, device: torch.device, max_wait: int = 32, *,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time,
                 machine_cpu: Callable[[], tuple[int, int] | None] | None = None):
        """`clock`, `cpu_clock` (this process) and `machine_cpu` ((idle, total) ticks of the
        machine, `machine_cpu_ticks`) are what it measures, replaceable in tests."""
        self.clock, self.cpu_clock = clock, cpu_clock
        self.machine_cpu = machine_cpu or machine_cpu_ticks
        self.initial = torch.get_num_threads()
        self.active = (device.type == "cpu" and self.initial > 1 and _pinned is None
                       and "OMP_NUM_THREADS" not in os.environ)
        self.current = self.initial
        self.cost: dict[int, float] = {}  # threads -> seconds per padded token, recent
        self.wait = 1  # steps between tries: doubles after a try that loses
        self.max_wait = max_wait
        self.since_try = 0
        self.want_try = False
        self._trying: int | None = None
        self._start: tuple[float, float, tuple[int, int] | None] = (0.0, 0.0, None)

    def start(self) -> None:
        """Call before a step: sets the thread count it runs with."""
        if not self.active:
            return
        other = 1 if self.current == self.initial else self.initial
        self._trying = other if self.want_try and self.since_try >= self.wait else None
        torch.set_num_threads(self._trying or self.current)
        self._start = (self.clock(), self.cpu_clock(), self.machine_cpu())

    def stop(self, work: int) -> None:
        """Call after a step with its work (padded tokens)."""
        if not self.active or work <= 0:
            return
        wall0, cpu0, machine0 = self._start
        wall = max(self.clock() - wall0, 1e-9)
        n = self._trying or self.current
        cost = wall / work
        old = self.cost.get(n)
        # A try replaces what is known of a count; the running count is smoothed over steps.
        self.cost[n] = cost if old is None or self._trying else 0.5 * old + 0.5 * cost
        if self._trying is not None:
            self.since_try = 0
            if self.cost[n] < self.cost.get(self.current, float("inf")):
                self.current, self.wait = n, 1
            else:
                self.wait = min(2 * self.wait, self.max_wait)
        else:
            self.since_try += 1
        if self.current == self.initial:  # starved threads: try one
            share = (self.cpu_clock() - cpu0) / (wall * n)
            self.want_try = share < self.BUSY
        else:  # a free core: try them all
            machine = self.machine_cpu()
            if machine is None or machine0 is None:
                self.want_try = self.since_try >= self.max_wait
            else:
                idle, total = machine[0] - machine0[0], machine[1] - machine0[1]
                self.want_try = total > 0 and idle / total > self.IDLE

    def close(self) -> None:
        """Restore the thread count found at the start."""
        if self.active:
            torch.set_num_threads(self.initial)


def _load_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where there is none (not Linux, or musl)."""
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def trim() -> None:
        malloc_trim(0)

    return trim


trim_heap = _load_trim()
"""Hands the heap's free pages back to the OS. Called after each CPU step: matmul scratch
memory freed between the tensors the step kept leaves holes the next batch's shapes do not
fit; trimming them lowers the peak for little time per step."""


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(idle, total) CPU time of the whole machine in clock ticks, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)  # idle + iowait
