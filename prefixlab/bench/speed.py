"""Benchmark: PrefixLab's prefix training and label scoring against Hugging Face PEFT.

`python -m prefixlab.bench.speed` trains a prefix on a fixed, stratified sample of the Davidson
hate/offensive tweets twice: with PrefixLab, and with PEFT's `PrefixTuningConfig` used the way
its documentation shows (`get_peft_model`, a plain torch loop, AdamW on the PEFT parameters,
batches padded to their longest row in random order, labels -100 outside the label tokens).
Both get the same base model, data, prompt template, prefix length and initial prefix, batch
size, max length, learning-rate schedule, gradient clipping, epochs and seed. Held-out texts are
then scored both ways: `score_labels`, and every label's full sequence through PEFT's forward.
Ours then continues a few held-out prompts greedily (generation tokens/s). With
`--compare-precision bfloat16` ours runs again in that precision on the same rows, and a table
puts training examples/s, scoring examples/s and generation tokens/s side by side with their
ratio and the CPU's bfloat16 instructions (without them bf16 is emulated, and slower).

Each contender runs in its own child process (`--worker ours|peft`, started without a shell,
one JSON object on stdout), so its peak RSS is its own. The parent measures this machine's
float32 matmul peak (2048^3 products, MKL or oneDNN, whichever is faster) before and after,
prints a table with the targets and by how much each is missed, and ends with one
machine-readable `summary:` line.

The rooms beside this entry point: `task` (the settings and the sample both contenders
share), `contenders` (ours and PEFT), `machine` (matmul peak, memory, app starts), `report`
(the table and the `summary:` line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from prefixlab.bench.contenders import run_ours, run_peft
from prefixlab.bench.machine import (
    app_starts,
    matmul_gflops,
    non_embedding_parameters,
    peak_rss_bytes,
)
from prefixlab.bench.report import GB, format_report
from prefixlab.bench.task import CONTENDERS, VARIANTS, BenchConfig, build_task
from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.precision import DTYPES, PRECISIONS, cpu_isa, resolve_precision

QUICK = {"rows": 64, "eval_rows": 60, "epochs": 1}  # --quick: a smoke run of a few minutes


# --- worker -----------------------------------------------------------------------------------


def run_worker(contender: str, cfg: BenchConfig, loaded: LoadedModel | None = None,
               data: LabeledData | None = None) -> dict:
    """One contender end to end: load model and data, train, score. Returns a JSON-able dict."""
    from prefixlab.engine.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    began = time.perf_counter()
    if loaded is None:  # PEFT's model float32, as its documentation loads it
        loaded = load_model(cfg.model, cfg.device,
                            precision=cfg.precision if contender == "ours" else "float32")
    load_s = time.perf_counter() - began
    rss_after_load = peak_rss_bytes()
    if data is None:
        data = load_labeled_csv(Path(cfg.data_dir) / cfg.csv)
    task = build_task(loaded, cfg, data)
    run = {"ours": run_ours, "peft": run_peft}[contender]
    result = run(loaded, task, cfg)
    result.update({
        "contender": contender,
        "load_s": load_s,
        "peak_rss_load_bytes": rss_after_load,
        "non_embedding_parameters": non_embedding_parameters(loaded.model),
        "threads": torch.get_num_threads(),
        "precision": loaded.precision,
        "isa": cpu_isa(),
        "train_rows": len(task.train),
        "eval_rows": len(task.held_out),
    })
    return result


def spawn_worker(contender: str, cfg: BenchConfig, timeout: float | None = None) -> dict:
    """Run one contender in a child process (no shell); its last stdout line is the JSON."""
    cmd = [sys.executable, "-m", "prefixlab.bench.speed", "--worker", contender,
           "--config-json", json.dumps(asdict(cfg))]
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"worker {contender!r} exited with {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


# --- the parent: workers in turn, then the report -------------------------------------------


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              variants: Sequence[str] = (), app: bool = True,
              precisions: Sequence[str] = ()) -> str:
    """Matmul peaks, the workers interleaved (ours, peft, peft, ours, ...), then ours with one
    speed-up off per variant and in each of `precisions` beside its own, then two app starts;
    the report. Utilization is against the peak of the precision ours ran in."""
    used = resolve_precision(cfg.precision, cfg.device).name
    others = [p for p in dict.fromkeys(precisions) if p != used]
    dtypes = {name: DTYPES[name] for name in [used, *others]}
    by_precision = {name: matmul_gflops(device=cfg.device, dtype=dt, repeats=2 if
                                        name != "float32" else 5)
                    for name, dt in dtypes.items()}
    peaks = by_precision[used]
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    order = []
    for r in range(cfg.repeats):
        pair = [(name, r) for name in CONTENDERS]
        order += pair if r % 2 == 0 else pair[::-1]
    order += [(f"ours:{v}", 0) for v in variants if v != "full"]
    order += [(f"ours@{p}", 0) for p in others]
    ablations: dict[str, dict] = {}
    for name, r in order:
        name, _, precision = name.partition("@")
        contender, _, variant = name.partition(":")
        began = time.perf_counter()
        result = spawn_worker(contender, replace(cfg, repeat=r, variant=variant or "full",
                                                 precision=precision or cfg.precision))
        if precision:
            ablations[f"precision {precision}"] = result
        elif variant:
            ablations[variant] = result
        else:
            runs[contender].append(result)
        t = result["train"]
        gen = result.get("generate")
        log(f"[{name}{'@' + precision if precision else ''} seed {cfg.seed + r}] "
            f"{time.perf_counter() - began:.0f}s: "
            f"{t['examples_per_s']:.2f} ex/s, {t['tokens_per_s']:.1f} tok/s, "
            f"loss {t['final_loss']:.4f}, F1 {result['eval']['macro_f1']:.3f}, "
            + (f"generation {gen['tokens_per_s']:.1f} tok/s, " if gen else "")
            + f"peak RSS {result['peak_rss_train_bytes'] / GB:.2f} GB")
        peaks += matmul_gflops(repeats=3, device=cfg.device, dtype=dtypes[used])
    starts = app_starts(cfg.model) if app else None
    if starts:
        log(f"[app] page served after {starts[0]:.1f} s (first start), "
            f"{starts[1]:.1f} s (second)")
    by_precision[used] = peaks
    return format_report(cfg, runs, peaks, ablations, starts, by_precision)


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prefixlab.bench.speed",
                                description=__doc__.split("\n")[0])
    d = BenchConfig()
    p.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the reference CSVs (default $PREFIXLAB_SHARED_DATA or "
                        "../shared/data beside the repository)")
    p.add_argument("--rows", type=int, default=d.rows, help="training rows")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows, help="held-out rows scored")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--prefix-length", type=int, default=d.prefix_length)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="worker runs per contender, interleaved; medians reported")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default=d.device,
                   help="cpu (the targets are set for it) or cuda; both contenders run there")
    p.add_argument("--threads", type=int, default=None,
                   help="pin both contenders to N CPU threads (switches off ours' thread tuner)")
    p.add_argument("--ablations", action="store_true",
                   help="also train ours with each speed-up switched off (" +
                   "; ".join(f"{k}: {v}" for k, v in VARIANTS.items() if k != "full") + ")")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="ours' compute dtype, the model's (auto: bfloat16 where the processor "
                        "multiplies it natively, else float32); PEFT loads float32")
    p.add_argument("--compare-precision", action="append", default=[],
                   choices=[p for p in PRECISIONS if p != "auto"],
                   help="also train, score and generate with ours in this precision, side by "
                        "side with the ratio (repeatable)")
    p.add_argument("--gen-rows", type=int, default=d.gen_rows,
                   help="held-out prompts ours continues greedily for generation tokens/s "
                        "(0: none)")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens,
                   help="tokens generated per prompt (EOS does not end a row)")
    p.add_argument("--no-app", action="store_true",
                   help="skip timing two starts of app.py")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 64 train rows, 60 held-out rows, 1 epoch")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.worker:
        cfg = BenchConfig(**json.loads(args.config_json))
        print(json.dumps(run_worker(args.worker, cfg)), flush=True)
        return 0
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    if args.quick:  # shorter defaults; sizes given explicitly still win
        defaults = BenchConfig()
        for name, value in QUICK.items():
            if values[name] == getattr(defaults, name):
                values[name] = value
    cfg = BenchConfig(**values)
    variants = [v for v in VARIANTS if v != "full"] if args.ablations else []
    print(run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
                    variants=variants, app=not args.no_app,
                    precisions=args.compare_precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
