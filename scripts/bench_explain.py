"""Explain's cost and what its readouts find, on a run of the default model (issue 28 items
3 and 5): the time to explain one typed text (prefix, start and bare rows plus every word
left out under the prefix and the bare model, one mixed batch; target <= 3 s on 2 CPU
cores), the overlap of the words that move the prefix's decisions with TF-IDF's heaviest
words over validation rows, and how many of the model's descriptions of its prefix name the
task or a label.

Usage (wrap in `flock /work/bench.lock` on a shared machine):
    python scripts/bench_explain.py RUN_FOLDER [--rows N] [--repeats R]
RUN_FOLDER: e.g. `python -m prefixlab train /work/shared/data/polarity_sentences.csv
--output RUN_FOLDER --preset quick --task "..."`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Idle OpenMP threads sleep instead of spinning (as tests/conftest.py): on 2 shared cores a
# spinning thread steals the core another process's work needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prefixlab.interpret.describe import beyond_start, naming_count  # noqa: E402
from prefixlab.runs.explanation import (  # noqa: E402
    describe_run,
    explain_text,
    word_agreement,
)
from prefixlab.runs.finished import open_run  # noqa: E402
from prefixlab.runs.inspection import run_start  # noqa: E402

TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish, and the script assumes "
    "that not only would subtlety be lost on the target audience, but that it's also too "
    "stupid to realize that they've already seen this exact same movie a hundred times",
    "an utterly charming and hilarious film that reminded me why i love going to the movies",
    "it's a bad sign when you're rooting for the film to end.",
    "effective but too-tepid biopic",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--rows", type=int, default=100, help="validation rows explained")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    run = open_run(args.run)
    start = run_start(run)
    print(f"run {args.run}: {run.loaded.name}, start from {start.source}", flush=True)
    explain_text(run, start.kv, TEXTS[0])  # warm-up, not timed
    times = []
    for _ in range(args.repeats):
        for text in TEXTS:
            t0 = time.perf_counter()
            ex = explain_text(run, start.kv, text)
            times.append((len(ex.words), time.perf_counter() - t0, 3 + 2 * len(ex.words)))
    tokens = [len(run.encoder.prompt(t)[0]) for t in TEXTS]
    print(f"prompt tokens per text: {tokens}")
    per = sorted(t for _, t, _ in times)
    print(f"explain one text: median {per[len(per) // 2]:.2f} s, max {per[-1]:.2f} s over "
          f"{len(per)} texts of {min(w for w, *_ in times)}-{max(w for w, *_ in times)} words "
          f"(target <= 3 s)", flush=True)
    for words, t, rows in times[:len(TEXTS)]:
        print(f"  {words:3d} words, {rows:3d} rows: {t:.2f} s", flush=True)
    if not args.rows:
        return

    t0 = time.perf_counter()
    agreement = word_agreement(run, args.rows)
    print(f"validation words: {time.perf_counter() - t0:.0f} s")
    print("\n".join(agreement.lines()))

    t0 = time.perf_counter()
    described = describe_run(run, start.kv)
    print(f"descriptions: {time.perf_counter() - t0:.1f} s; {naming_count(described)} of "
          f"{len(described)} name the task or a label, {beyond_start(described)} beyond what "
          "the start's description names")
    for d in described:
        print(f"  [{d.layers}] {d.prompt} … {d.text!r} names {d.named or '-'}")
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
