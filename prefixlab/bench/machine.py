"""What the speed benchmark measures about this machine and its processes, apart from the
contenders: where the shared data lives, the matmul peak, a process's peak memory, the
parameters a token multiplies by, and how long `python app.py` takes to serve its page.

The ddp and generation benchmarks use the data folder and the memory peak too.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from prefixlab.engine import cpu

REPO = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """$PREFIXLAB_SHARED_DATA, else `shared/data` beside the repository (`../shared/data`)."""
    env = os.environ.get("PREFIXLAB_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu",
                  dtype: torch.dtype | None = None) -> list[float]:
    """GFLOP/s of `repeats` n^3 products (after one warm-up).

    On CPU float32, each figure the faster of torch's default (MKL) and oneDNN, the library
    ours' lean step multiplies with (prefixlab.engine.cpu.linear): the limit is what the machine
    can do, whichever library does it. On CUDA bf16, the dtype training computes in there, and
    8192^3, the size a GPU needs to reach its peak. `dtype` given: that dtype's peak (oneDNN
    takes bfloat16 only where the CPU has AMX or AVX512-BF16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        n, dtype = 8192, dtype or torch.bfloat16
    else:
        dtype = dtype or torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    products = [lambda: a @ b]
    if dev.type == "cpu" and cpu.ONEDNN and (dtype == torch.float32 or cpu.native_bf16(dev)):
        products.append(lambda: cpu.linear(a, b))
    out = []
    for i in range(repeats + 1):
        rates = []
        for product in products:
            _sync(dev)
            start = time.perf_counter()
            product()
            _sync(dev)
            rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
        if i:  # the first is a warm-up
            out.append(max(rates))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_bytes() -> int:
    """Peak CUDA memory torch allocated in this process (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image.

    VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak over fork + exec, so a
    worker started from a big parent would report the parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside embedding tables and the LM head (tied or not): what a token's
    forward multiplies by (2 FLOPs each), and its backward to the activations again."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip |= {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _app_start_seconds(app: Path, data_dir: Path, model: str | None,
                       timeout: float = 180.0) -> float:
    """Seconds from launching `python app.py` to its page answering 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, str(app), "--port", str(port), "--data-dir", str(data_dir)]
    if model:
        cmd += ["--model", model]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=app.parent)
    try:
        while time.perf_counter() - began < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode} before serving:\n"
                                   + proc.stderr.read()[-2000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - began
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"app.py did not serve {url} within {timeout:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def app_starts(model: str | None, app: Path = REPO / "app.py") -> list[float] | None:
    """Page-served seconds of two app starts in a row, each in a fresh data folder: the first
    may convert the default model; the second finds it converted. None without app.py."""
    if not app.is_file():
        return None
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="prefixlab-bench-app-") as tmp:
            times.append(_app_start_seconds(app, Path(tmp), model))
    return times
