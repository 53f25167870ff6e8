"""The shift benchmark: does a recipe hold up on topics it never trained or validated on?

    python -m prefixlab.bench.shift [--data-dir ../shared/data]
        [--sets davidson,disaster,tweets] [--cross polarity-tweets,tweets-polarity]
        [--sizes 300] [--seeds 0,1,2]
        [--variants default,one-rate,one-epoch,topics-val,pull,average,dropout,lr-0.01]
        [--preset quick|balanced|thorough] [--set KEY=VALUE ...] [--test-rows 300]
        [--output shift.json]
    python -m prefixlab.bench.shift --table shift.json [more.json ...]

Each set is split once, from the data itself (data/topics.py): its texts are clustered
(TF-IDF + k-means, seed 0), whole clusters holding about a quarter of the rows become the
shifted test, so its topics never appear in training or validation; the rest is split at
random into an in-distribution test (the same topics as training) and the pool training rows
are drawn from. A cross pair trains on one set and takes the other's rows as the shifted test
(movie sentences <-> tweets). Every variant (a named group of settings, below) trains on the
same rows per seed and is scored on both tests, beside TF-IDF + LR and the bare model; the
prefix's decision is also read adapted to the shifted rows without their labels (EM prior,
batch calibration: balance.adapted_rule). The last line, `shift: ...`, is for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prefixlab.bench.quality import (
    CROSS,
    SETS,
    _default_data_dir,
    _parse_overrides,
    _scores,
    fixed_split,
    load_set,
    preset_overrides,
    sample_rows,
    train_rows,
)
from prefixlab.data.topics import cluster_split
from prefixlab.runs.presets import CLI_NAMES

VARIANTS: dict[str, dict] = {
    "default": {},
    "one-rate": {"training.try_learning_rates": ()},  # the default before the rate was chosen
    "one-epoch": {"training.epochs": 1, "training.try_learning_rates": ()},
    "topics-val": {"validation_split": "topics"},
    "pull": {"training.start_pull": 0.1},
    "average": {"training.average_last": 3},
    "dropout": {"training.prefix_dropout": 0.1},
    "lr-0.01": {"training.learning_rate": 0.01, "training.try_learning_rates": ()},
}
"""Each lever of issue 32 alone, as overrides of the recipe under test."""
SHIFT_SHARE = 0.25  # of a set's rows, held out as whole topic clusters
SHIFT_CLUSTERS = 12


@dataclass
class ShiftCase:
    name: str
    train: pd.DataFrame
    in_test: pd.DataFrame  # the training topics, rows never trained on
    shift_test: pd.DataFrame  # other topics (or the other set of a cross pair)
    n: int
    seed: int


def topic_split_frame(frame: pd.DataFrame, test_rows: int, seed: int = 0
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pool, in-distribution test, shifted test) of one set: whole topic clusters shifted,
    the in-distribution test a random, near-duplicate-grouped share of the rest; each test at
    most `test_rows` rows (a seeded sample, stratified where the labels allow)."""
    kept, held = cluster_split(frame["text"].tolist(), SHIFT_SHARE, seed, SHIFT_CLUSTERS)
    shifted = frame.iloc[held].reset_index(drop=True)
    pool, in_test = fixed_split(frame.iloc[kept].reset_index(drop=True), test_rows, seed)
    if len(shifted) > test_rows:
        shifted = sample_rows(shifted, test_rows, seed)
    return pool, in_test, shifted


def build_cases(data_dir: Path, sets: Sequence[str], cross: Sequence[str], sizes: Sequence[int],
                seeds: Sequence[int], test_rows: int) -> list[ShiftCase]:
    splits = {name: topic_split_frame(load_set(data_dir, name), test_rows)
              for name in set(sets) | {s for c in cross for s in CROSS[c]}}
    cases = []
    for n in sizes:
        for seed in seeds:
            for name in sets:
                pool, in_test, shifted = splits[name]
                cases.append(ShiftCase(name, sample_rows(pool, n, seed), in_test, shifted, n,
                                       seed))
            for c in cross:
                src, dst = CROSS[c]
                pool, in_test, _ = splits[src]
                dst_all = pd.concat(splits[dst][1:], ignore_index=True)
                other = sample_rows(dst_all, min(test_rows, len(dst_all)), 0)
                cases.append(ShiftCase(f"{src}->{dst}", sample_rows(pool, n, seed), in_test,
                                       other, n, seed))
    return cases


def run_folder_of(workdir: Path, case: ShiftCase, variant: str) -> Path:
    return workdir / f"{case.name.replace('->', '_to_')}_{case.n}_{case.seed}_{variant}"


def run_variant(case: ShiftCase, variant: str, loaded, workdir: Path, overrides: dict) -> dict:
    """Train the variant on the case's rows; score the prefix on both tests."""
    from prefixlab.engine.balance import adapted_rule
    from prefixlab.engine.predict import score_log_likelihoods
    from prefixlab.runs.finished import open_run
    from prefixlab.runs.folder import RunFolder

    folder = run_folder_of(workdir, case, variant)
    trained = train_rows(case.train, folder, loaded, case.seed,
                         {**overrides, **VARIANTS[variant]})
    report, train_s, run_folder = trained.report, trained.seconds, RunFolder(folder)
    run = open_run(folder, loaded)
    labels = run.labels
    start = run_folder.load_snapshot(0)
    row = {"case": case.name, "variant": variant, "n": case.n, "seed": case.seed,
           "train_s": train_s, "kept_step": report["kept_step"], "steps": report["steps"],
           "stop_reason": report["stop_reason"], "val_macro_f1": report["macro_f1"],
           "prior_scale": (report.get("decision_fit") or {}).get("prior_scale"),
           "learning_rate": report.get("learning_rate"),  # the one kept, when several tried
           "drift": float((run.kv - start).norm() / start.norm())}
    for side, test in (("in", case.in_test), ("shift", case.shift_test)):
        texts, gold = test["text"].tolist(), test["label"].tolist()
        ll = score_log_likelihoods(loaded.model, run.kv, run.encoder, texts)
        for how in ("none", "em", "batch"):
            rule = adapted_rule(run.encoder.rule, ll, how)
            pred = [labels[i] for i in rule.probs(ll).argmax(1)]
            row[f"{side}_{how}"] = _scores(gold, pred, labels)
    return row


def baselines(case: ShiftCase, loaded, labels: list[str], encoder) -> dict:
    """TF-IDF + LR on the case's rows and the bare model, on both tests."""
    from prefixlab.engine.predict import score_log_likelihoods
    from prefixlab.runs.evaluate import tfidf_baseline

    out = {}
    for side, test in (("in", case.in_test), ("shift", case.shift_test)):
        texts, gold = test["text"].tolist(), test["label"].tolist()
        tfidf = tfidf_baseline(case.train["text"].tolist(), case.train["label"].tolist(),
                               texts, case.seed)
        out[f"tfidf_{side}"] = _scores(gold, tfidf, labels)
        zero = score_log_likelihoods(loaded.model, None, encoder.without_prior(), texts)
        out[f"bare_{side}"] = _scores(gold, [labels[i] for i in zero.argmax(1)], labels)
    return out


def markdown_table(rows: list[dict]) -> str:
    """One line per (case, variant): in-distribution and shifted macro-F1 side by side (mean
    over seeds, range when several), the shifted ones adapted too, TF-IDF and the bare model."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["variant"]), []).append(r)

    def cell(rs: list[dict], key: str) -> str:
        values = [r[key]["macro_f1"] for r in rs]
        text = f"{np.mean(values):.3f}"
        return text + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")

    out = ["| case | variant | seeds | val | in-dist | shifted | shifted, EM prior | shifted, "
           "batch cal. | TF-IDF in / shifted | bare in / shifted | kept / steps | drift |",
           "|" + "---|" * 12]
    for (case, variant), rs in groups.items():
        kept = ", ".join(f"{r['kept_step']}/{r['steps']}" for r in rs)
        if chosen := [f"{r['learning_rate']:g}" for r in rs if r.get("learning_rate")]:
            variant = f"{variant} (kept lr {', '.join(chosen)})"
        out.append(
            f"| {case} | {variant} | {len(rs)} | {np.mean([r['val_macro_f1'] for r in rs]):.3f} "
            f"| {cell(rs, 'in_none')} | {cell(rs, 'shift_none')} | {cell(rs, 'shift_em')} | "
            f"{cell(rs, 'shift_batch')} | {cell(rs, 'tfidf_in')} / {cell(rs, 'tfidf_shift')} "
            f"| {cell(rs, 'bare_in')} / {cell(rs, 'bare_shift')} | {kept} | "
            f"{np.mean([r['drift'] for r in rs]):.2f} |")
    return "\n".join(out)


def summarize(rows: list[dict]) -> str:
    parts = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        parts.append(f"{variant}_in={np.mean([r['in_none']['macro_f1'] for r in rs]):.3f} "
                     f"{variant}_shift={np.mean([r['shift_none']['macro_f1'] for r in rs]):.3f}")
    tfidf = np.mean([r["tfidf_shift"]["macro_f1"] for r in rows])
    return f"shift: rows={len(rows)} " + " ".join(parts) + f" tfidf_shift={tfidf:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixlab.bench.shift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=_default_data_dir())
    parser.add_argument("--sets", default="davidson,disaster,tweets")
    parser.add_argument("--cross", default="polarity-tweets,tweets-polarity",
                        help="a comma list of " + ", ".join(CROSS) + ", or none")
    parser.add_argument("--sizes", default="300")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--preset", choices=tuple(CLI_NAMES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="ROWS_JSON")
    args = parser.parse_args(argv)
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())["rows"]]
        print(markdown_table(rows))
        print(summarize(rows))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prefixlab.engine.models import DEFAULT_MODEL, load_model

    sets = [s for s in args.sets.split(",") if s]
    cross = [c for c in args.cross.split(",") if c and c != "none"]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted((set(sets) - set(SETS)) | (set(cross) - set(CROSS))
                     | (set(variants) - set(VARIANTS)))
    if unknown:
        raise SystemExit(f"unknown sets, cross pairs or variants: {', '.join(unknown)}")
    overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                 **_parse_overrides(args.set)}
    if args.model:  # the runs name the model they train on, as open_run checks
        overrides["model"] = args.model
    cases = build_cases(args.data_dir, sets, cross, [int(x) for x in args.sizes.split(",")],
                        [int(x) for x in args.seeds.split(",")], args.test_rows)
    loaded = load_model(args.model or DEFAULT_MODEL, "cpu",
                        precision=str(overrides.get("precision", "auto")))
    print(f"{len(cases)} cases x {len(variants)} variants; overrides: {overrides or 'none'}",
          flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prefixlab-shift-") as tmp:
        for case in cases:
            base: dict | None = None
            for variant in variants:
                row = run_variant(case, variant, loaded, Path(tmp), overrides)
                if base is None:
                    from prefixlab.runs.finished import open_run

                    run = open_run(run_folder_of(Path(tmp), case, variant), loaded)
                    base = baselines(case, loaded, run.labels, run.encoder)
                rows.append({**row, **base})
                r = rows[-1]
                print(f"{r['case']:<16} {r['variant']:<11} seed {r['seed']}  val "
                      f"{r['val_macro_f1']:.3f}  in {r['in_none']['macro_f1']:.3f}  shift "
                      f"{r['shift_none']['macro_f1']:.3f} (em {r['shift_em']['macro_f1']:.3f}, "
                      f"batch {r['shift_batch']['macro_f1']:.3f})  tfidf "
                      f"{r['tfidf_in']['macro_f1']:.3f}/{r['tfidf_shift']['macro_f1']:.3f}  bare "
                      f"{r['bare_in']['macro_f1']:.3f}/{r['bare_shift']['macro_f1']:.3f}  kept "
                      f"{r['kept_step']}/{r['steps']}  drift {r['drift']:.2f}  "
                      f"{r['train_s']:.0f} s", flush=True)
                if args.output:
                    args.output.write_text(json.dumps({"overrides": overrides, "rows": rows},
                                                      indent=1, default=float))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
