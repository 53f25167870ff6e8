"""Benchmark: one training process with all cores against N data-parallel processes.

`python -m prefixlab.bench.ddp` trains the same small run on the default model (a fixed,
stratified sample of the Davidson tweets) twice per repeat, through the real CLI: once as one
process with C threads (`--nproc 1`, OMP_NUM_THREADS=C) and once as N ranks started by torch's
launcher with C/N threads each (`--nproc N`). Both read the same batches in the same order and
end with the same prefix (tests/test_distributed.py); what differs is how the cores are used.

Training examples/s is read from each run's metrics log after its first steps (model loading,
process start and evaluation excluded); wall seconds count everything, the launcher included.
The two layouts alternate within each repeat (A B, B A, ...) so that a slow spell of a shared
machine does not land on one of them only; medians are reported, then a `summary:` line.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefixlab.bench.machine import default_data_dir
from prefixlab.bench.task import DEFAULT_CSV, sample_split
from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.runs.folder import RunFolder

WARM_STEPS = 2  # steps left out of the rate: the first ones pay for lazy allocations


@dataclass
class Layout:
    processes: int
    threads: int

    @property
    def name(self) -> str:
        p = "process" if self.processes == 1 else "processes"
        t = "thread" if self.threads == 1 else "threads"
        return f"{self.processes} {p} x {self.threads} {t}"


def steady_rate(records: list[dict], warm: int = WARM_STEPS) -> float:
    """Examples per second between the end of step `warm` and the last step."""
    steps = [r for r in records if r.get("type") == "step"]
    if len(steps) <= warm:
        raise ValueError(f"only {len(steps)} steps logged; need more than {warm}")
    first, last = steps[warm - 1] if warm else None, steps[-1]
    seen_last = last["examples_per_s"] * last["elapsed_s"]
    if first is None:
        return seen_last / last["elapsed_s"]
    seen_first = first["examples_per_s"] * first["elapsed_s"]
    return (seen_last - seen_first) / (last["elapsed_s"] - first["elapsed_s"])


def _write_csv(path: Path, data: LabeledData) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data.texts, data.labels, strict=True))


def run_layout(layout: Layout, train_csv: Path, val_csv: Path, out: Path,
               args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "prefixlab", "train", str(train_csv), "--validation-csv",
           str(val_csv), "--text-column", "text", "--label-column", "label", "--output",
           str(out), "--device", "cpu", "--nproc", str(layout.processes), "--epochs", "1",
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--seed", str(args.seed)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(layout.threads)}
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{layout.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records, _ = RunFolder(out).read_metrics()
    return {"examples_per_s": steady_rate(records), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    parser = argparse.ArgumentParser(prog="python -m prefixlab.bench.ddp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--csv", default=DEFAULT_CSV)
    parser.add_argument("--rows", type=int, default=96, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--cores", type=int, default=cores, help="threads x processes")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the second layout")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args(argv)
    if args.cores % args.nproc:
        parser.error(f"--cores {args.cores} does not split into {args.nproc} processes")

    data = load_labeled_csv(Path(args.data_dir) / args.csv)
    train_part, held_out = sample_split(data, args.rows, args.eval_rows, args.seed)
    layouts = [Layout(1, args.cores), Layout(args.nproc, args.cores // args.nproc)]
    results: dict[str, list[dict]] = {layout.name: [] for layout in layouts}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        tmp_path = Path(tmp)
        train_csv, val_csv = tmp_path / "train.csv", tmp_path / "validation.csv"
        _write_csv(train_csv, train_part)
        _write_csv(val_csv, held_out)
        print(f"{len(train_part)} training rows of {args.csv}, batch {args.batch_size}, max "
              f"length {args.max_length}, {args.cores} cores, {args.repeats} repeats",
              flush=True)
        for r in range(args.repeats):
            for layout in layouts if r % 2 == 0 else layouts[::-1]:
                res = run_layout(layout, train_csv, val_csv, tmp_path / f"{r}-{layout.name}",
                                 args)
                results[layout.name].append(res)
                print(f"  repeat {r}: {layout.name}: {res['examples_per_s']:.2f} ex/s, "
                      f"{res['wall_s']:.1f} s wall", flush=True)
    med = {name: {k: statistics.median(x[k] for x in runs) for k in ("examples_per_s", "wall_s")}
           for name, runs in results.items()}
    one, many = (med[layout.name] for layout in layouts)
    ratio = many["examples_per_s"] / one["examples_per_s"]
    wall_ratio = many["wall_s"] / one["wall_s"]
    print(f"\n{'layout':<26}{'train ex/s':>12}{'wall s':>10}")
    for layout in layouts:
        m = med[layout.name]
        print(f"{layout.name:<26}{m['examples_per_s']:>12.2f}{m['wall_s']:>10.1f}")
    print(f"{'ratio (second / first)':<26}{ratio:>12.2f}{wall_ratio:>10.2f}")
    print(f"summary: ddp_examples_ratio={ratio:.3f} ddp_wall_ratio={wall_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
