"""The speed benchmark's report: medians across repeats, the table of both contenders, the
ratios against the targets, the ablation rows, and the machine-readable `summary:` line.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from prefixlab.bench.task import CONTENDERS, VARIANTS, BenchConfig

GB = 1e9

# Targets from issue 5; `higher` says which direction meets a target.
TARGETS = {
    "train_speedup": (2.0, "higher"),
    "score_speedup": (2.0, "higher"),
    "flop_utilization": (0.8, "higher"),
    "peak_rss_gb": (1.5, "lower"),
    "label_agreement": (1.0, "higher"),
    "app_start_s": (8.0, "lower"),
}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(runs: dict[str, list[dict]], peaks: list[float],
              app_starts: Sequence[float] | None = None) -> dict:
    """Medians across repeats, ratios and the issue's headline numbers."""
    def med(name: str, *path: str) -> float:
        vals = []
        for r in runs[name]:
            v = r
            for p in path:
                v = v[p]
            vals += v if isinstance(v, list) else [v]
        return _median(vals)

    peak = _median(peaks)
    ours_tok = med("ours", "train", "tokens_per_s")
    n_params = runs["ours"][0]["non_embedding_parameters"]
    ours_score = _median(
        [x for r in runs["ours"] for x in r["score"]["examples_per_s"]]
        + [x for r in runs["peft"] for x in r["ours_score"]["examples_per_s"]]
    )
    return {
        "train_speedup": med("ours", "train", "examples_per_s")
        / med("peft", "train", "examples_per_s"),
        "score_speedup": ours_score / med("peft", "score", "examples_per_s"),
        "flop_utilization": 4 * n_params * ours_tok / (peak * 1e9),
        "peak_rss_gb": max(r["peak_rss_train_bytes"] for r in runs["ours"]) / GB,
        "macro_f1_ours": med("ours", "eval", "macro_f1"),
        "macro_f1_peft": med("peft", "eval", "macro_f1"),
        "label_agreement": min(r["agreement"]["labels"] for r in runs["peft"]),
        "app_start_s": app_starts[-1] if app_starts else float("nan"),
        "ours_score_examples_per_s": ours_score,
        "matmul_gflops": peak,
    }


def _miss(name: str, value: float) -> str:
    target, direction = TARGETS[name]
    if value != value:  # NaN
        return "not measured"
    ok = value >= target if direction == "higher" else value <= target
    if ok:
        return "met"
    if direction == "higher":
        return f"MISSED by {target - value:.2f} ({value / target:.0%} of target)"
    return f"MISSED by {value - target:.2f} ({value / target:.0%} of limit)"


def format_report(cfg: BenchConfig, runs: dict[str, list[dict]], peaks: list[float],
                  ablations: dict[str, dict] | None = None,
                  app_starts: Sequence[float] | None = None,
                  by_precision: dict[str, list[float]] | None = None) -> str:
    """The table, the ratios against targets, and the machine-readable last line. `peaks`:
    the matmul peaks of the precision ours ran in (utilization's denominator);
    `by_precision`: every precision's measured peaks, printed."""
    s = summarize(runs, peaks, app_starts)
    cuda = torch.device(cfg.device).type == "cuda"
    used = runs["ours"][0].get("precision", "bfloat16" if cuda else "float32")
    size = "8192^3" if cuda else "2048^3"
    how = " (faster of MKL and oneDNN)" if not cuda and used == "float32" else ""
    peak_label = f"{used} {size}{how}"
    isa = runs["ours"][0].get("isa", "unknown")

    def med(name: str, *path: str) -> float:
        vals = []
        for r in runs[name]:
            v = _dig(r, path)
            vals += v if isinstance(v, list) else [v]
        return _median(vals)

    lines = [
        f"prefixlab.bench.speed: {runs['ours'][0]['train_rows']} train rows, "
        f"{runs['ours'][0]['eval_rows']} held-out rows of {cfg.csv}, epochs {cfg.epochs}, "
        f"batch {cfg.batch_size}, prefix {cfg.prefix_length}, max length {cfg.max_length}, "
        f"lr {cfg.learning_rate}, seed {cfg.seed}, repeats {cfg.repeats}, "
        f"threads {runs['ours'][0]['threads']}, device {cfg.device}",
        f"{peak_label} matmul peak (median of {len(peaks)}): {s['matmul_gflops']:.1f} GFLOP/s "
        f"(range {min(peaks):.1f}-{max(peaks):.1f})",
        *disturbance_warning(peaks),
        f"CPU bfloat16 instructions: {isa}; ours computed in {used}, PEFT in "
        f"{runs['peft'][0].get('precision', 'float32')}",
        *(f"{name} {size} matmul peak (median of {len(v)}): {_median(v):.1f} GFLOP/s"
          for name, v in (by_precision or {}).items() if name != used),
        "",
        f"{'training':<28}{'ours':>12}{'peft':>12}{'ratio':>9}",
    ]
    rows = [
        ("examples/s", ("train", "examples_per_s"), "{:.2f}"),
        ("non-padding tokens/s", ("train", "tokens_per_s"), "{:.1f}"),
        ("seconds/step (median)", ("train", "step_s_median"), "{:.3f}"),
        ("train seconds", ("train", "seconds"), "{:.1f}"),
        ("padding share", None, "{:.1%}"),
        ("CPU share (1 = cores ours)", ("train", "cpu_share"), "{:.2f}"),
        ("threads (mean over steps)", ("train", "threads_mean"), "{:.2f}"),
        ("peak RSS, training (GB)", ("peak_rss_train_bytes",), "{:.2f}"),
        ("peak RSS, whole worker (GB)", ("peak_rss_bytes",), "{:.2f}"),
        *([("peak GPU memory, training (GB)", ("peak_gpu_train_bytes",), "{:.2f}")]
          if cuda else []),
        ("first-epoch loss (mean)", ("train", "first_loss"), "{:.4f}"),
        ("final-epoch loss (mean)", ("train", "final_loss"), "{:.4f}"),
        ("held-out macro-F1", ("eval", "macro_f1"), "{:.3f}"),
        ("held-out accuracy", ("eval", "accuracy"), "{:.3f}"),
        ("model load seconds", ("load_s",), "{:.1f}"),
    ]
    for label, path, fmt in rows:
        if path is None:
            vals = [1 - med(n, "train", "real_tokens") / med(n, "train", "padded_tokens")
                    for n in CONTENDERS]
        else:
            vals = [med(n, *path) for n in CONTENDERS]
            if "bytes" in path[-1]:
                vals = [v / GB for v in vals]
        ratio = f"{vals[0] / vals[1]:.2f}x" if vals[1] else "-"
        lines.append(f"{label:<28}{fmt.format(vals[0]):>12}{fmt.format(vals[1]):>12}{ratio:>9}")
    peft_score = med("peft", "score", "examples_per_s")
    agree = runs["peft"][0]["agreement"]
    lines += [
        "",
        f"{'scoring (held-out texts)':<28}{'ours':>12}{'peft':>12}{'ratio':>9}",
        f"{'examples/s':<28}{s['ours_score_examples_per_s']:>12.2f}{peft_score:>12.2f}"
        f"{s['score_speedup']:>8.2f}x",
        f"label agreement (same prefix): {s['label_agreement']:.3f}; "
        f"largest probability difference {agree['max_abs_prob_diff']:.2e}",
        "",
        f"useful-FLOP utilization: 4 x {runs['ours'][0]['non_embedding_parameters'] / 1e6:.1f}M "
        f"non-embedding params x {med('ours', 'train', 'tokens_per_s'):.1f} tokens/s / "
        f"{s['matmul_gflops']:.1f} GFLOP/s = {s['flop_utilization']:.2f} "
        f"(PEFT: {4 * runs['ours'][0]['non_embedding_parameters'] * med('peft', 'train', 'tokens_per_s') / (s['matmul_gflops'] * 1e9):.2f})",  # noqa: E501
    ]
    precisions = {k: r for k, r in (ablations or {}).items() if k.startswith("precision ")}
    if precisions:
        lines += ["", *precision_table(runs["ours"][0], list(precisions.values()), isa)]
    if ablations:
        lines += ["", *_ablation_table(runs, ablations)]
    if app_starts:
        lines += ["", f"app.py to a served page: {app_starts[0]:.1f} s (first start), "
                      f"{app_starts[-1]:.1f} s (second start, the model already converted)"]
    lines += [
        "",
        f"{'target':<20}{'value':>10}{'goal':>10}  result",
    ]
    for name, (target, direction) in TARGETS.items():
        goal = f"{'>=' if direction == 'higher' else '<='} {target:g}"
        lines.append(f"{name:<20}{s[name]:>10.3f}{goal:>10}  {_miss(name, s[name])}")
    f1_ok = s["macro_f1_ours"] >= s["macro_f1_peft"]
    lines.append(f"{'macro_f1 ours-peft':<20}{s['macro_f1_ours'] - s['macro_f1_peft']:>10.3f}"
                 f"{'>= 0':>10}  "
                 + ("met" if f1_ok else
                    f"MISSED by {s['macro_f1_peft'] - s['macro_f1_ours']:.3f}"))
    lines += ["", summary_line(s)]
    return "\n".join(lines)


DISTURBED = 0.8
"""Slowest matmul peak / median below which something else used the cores during the run."""


def disturbance_warning(peaks: Sequence[float]) -> list[str]:
    """A warning when the machine's own matmul speed moved during the run: then every figure
    here, the utilization above all (its denominator is the median peak), is suspect."""
    low, mid = min(peaks), _median(peaks)
    if low >= DISTURBED * mid:
        return []
    return [f"WARNING: the matmul peak fell to {low / mid:.0%} of its median during the run: "
            "another process or a noisy neighbour shared the cores, so speeds and the "
            "utilization are unreliable. Run again on an idle machine."]


def _ablation_table(runs: dict[str, list[dict]], ablations: dict[str, dict]) -> list[str]:
    """Ours as shipped against ours with one speed-up off (first repeat's seed) and PEFT."""
    full, peft = runs["ours"][0], runs["peft"][0]
    rows = [("as shipped", full), *((VARIANTS.get(k, k), r) for k, r in ablations.items()),
            ("PEFT", peft)]
    base = full["train"]["examples_per_s"]
    lines = [
        "what each speed-up buys (ours, first seed; one switched off per row)",
        f"{'':<58}{'precision':>10}{'ex/s':>7}{'score ex/s':>11}{'RSS GB':>8}{'F1':>7}"
        f"{'shipped/row':>13}",
    ]
    for label, r in rows:
        eps = r["train"]["examples_per_s"]
        score = _median(r.get("score", {}).get("examples_per_s", []))
        lines.append(f"{label:<58}{r.get('precision', ''):>10}{eps:>7.2f}{score:>11.2f}"
                     f"{r['peak_rss_train_bytes'] / GB:>8.2f}"
                     f"{r['eval']['macro_f1']:>7.3f}{base / eps:>12.2f}x")
    return lines


PRECISION_ROWS = [
    ("training examples/s", ("train", "examples_per_s"), "{:.2f}"),
    ("scoring examples/s", ("score", "examples_per_s"), "{:.2f}"),
    ("generation tokens/s", ("generate", "tokens_per_s"), "{:.1f}"),
]


def precision_table(base: dict, others: Sequence[dict], isa: str) -> list[str]:
    """Ours in its own precision (`base`, the first seed) beside the same run in each other
    precision (`--compare-precision`): the same rows and batches, so the ratios are the
    precisions' speeds alone. `isa`: the CPU's bfloat16 instructions, without which bf16
    runs emulated."""
    cols = [base, *others]
    names = [str(r.get("precision", "?")) for r in cols]
    ratios = [f"{n}/{names[0]}" for n in names[1:]]
    lines = [
        f"ours in each precision (first seed; CPU bfloat16 instructions: {isa})",
        f"{'':<28}" + "".join(f"{n:>12}" for n in names) + "".join(f"{r:>19}" for r in ratios),
    ]
    for label, path, fmt in PRECISION_ROWS:
        vals = []
        for r in cols:
            try:
                v = _dig(r, path)
            except KeyError:  # e.g. a run without generation (gen_rows 0)
                v = float("nan")
            vals.append(_median(v) if isinstance(v, list) else float(v))
        shown = "".join(f"{fmt.format(v):>12}" for v in vals)
        shown += "".join(f"{v / vals[0]:>18.2f}x" if vals[0] else f"{'-':>19}"
                         for v in vals[1:])
        lines.append(f"{label:<28}{shown}")
    return lines


def _dig(d: dict, path: Sequence[str]):
    for p in path:
        d = d[p]
    return d


def summary_line(s: dict) -> str:
    return (
        f"summary: train_speedup={s['train_speedup']:.2f} score_speedup={s['score_speedup']:.2f} "
        f"flop_utilization={s['flop_utilization']:.2f} peak_rss_gb={s['peak_rss_gb']:.2f} "
        f"macro_f1_ours={s['macro_f1_ours']:.2f} macro_f1_peft={s['macro_f1_peft']:.2f} "
        f"label_agreement={s['label_agreement']:.2f} app_start_s={s['app_start_s']:.1f}"
    )
