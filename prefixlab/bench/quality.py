"""The quality benchmark: does a prefix trained with the default settings beat cheap baselines?

    python -m prefixlab.bench.quality [--data-dir ../shared/data]
        [--sets davidson,polarity,disaster] [--sizes 300,2000] [--seeds 0,1,2]
        [--cross both|none|polarity-tweets|tweets-polarity]
        [--preset quick|balanced|thorough] [--set training.class_balance=sampled ...]
        [--output quality.json] [--scores DIR]
    python -m prefixlab.bench.quality --table quality.json [more.json ...]   # the README table

For every data set, a fixed test split (stratified, seed 0, near-duplicates grouped so that a
retweet never sits on both sides) is held out once. Each case then draws N training rows from
the rest (stratified, per seed) and gives them, as a user would give a CSV, to the default
recipe (80% train, 20% validation, early stopping). On the same test rows it reports the
prefix's macro-F1 beside TF-IDF + logistic regression (class-balanced, trained on all N rows),
the majority class and the bare model (zero-shot), with the training time, the kept step
and why training stopped. Cross-domain cases train on movie sentences (polarity) and test on
the positive/negative tweets of sentiment_tweets.csv, and the reverse.

The prefix's decision is also read with the other rules of balance.py (content-free
calibration, full prior correction, a prior strength fitted on the validation rows, per-label
offsets fitted there), so the default decision rule is a measured choice. `--scores DIR`
keeps each case's label scores on its validation and test rows (.npz, numbers and label
names only) for trying a decision rule without training again.
The last line, `quality: ...`, is for scripts. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prefixlab.runs.presets import CLI_NAMES, config_parts, preset

SETS = {
    "davidson": "davidson_hate_offensive.csv",
    "polarity": "polarity_sentences.csv",
    "disaster": "disaster_tweets.csv",
    "tweets": "sentiment_tweets.csv",  # positive/negative rows only: the cross-domain partner
}
CROSS = {"polarity-tweets": ("polarity", "tweets"), "tweets-polarity": ("tweets", "polarity")}
MISSED_SHARE = 0.05  # a class with this share of the test rows must not sit at zero recall


def _default_data_dir() -> Path:
    env = os.environ.get("PREFIXLAB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def group_key(text: str) -> str:
    """Near-duplicates share a key: lower case without links, mentions, 'rt' and punctuation."""
    t = re.sub(r"https?://\S+|@\w+|\brt\b", " ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", t).split())


def load_set(data_dir: Path, name: str) -> pd.DataFrame:
    path = data_dir / SETS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir (or PREFIXLAB_SHARED_DATA)")
    frame = pd.read_csv(path, dtype=str).dropna(subset=["text", "label"])
    frame["text"], frame["label"] = frame["text"].str.strip(), frame["label"].str.strip()
    frame = frame[frame["text"] != ""]
    if name == "tweets":
        frame = frame[frame["label"].isin(["positive", "negative"])]
    return frame.reset_index(drop=True)


def fixed_split(frame: pd.DataFrame, test_rows: int, seed: int = 0
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool, test): whole groups of near-duplicates on one side, stratified by the group's
    first label; the test is at most `test_rows` rows (or 20% of the groups)."""
    keys = frame["text"].map(group_key)
    first = frame.groupby(keys, sort=False).head(1)  # one row per group decides its side
    n_test = min(test_rows, len(first) // 5)
    rng = np.random.default_rng(seed)
    test_keys: set[str] = set()
    for _, part in first.groupby("label"):
        take = round(n_test * len(part) / len(first))
        test_keys.update(keys[rng.choice(part.index, size=take, replace=False)])
    in_test = keys.isin(test_keys)
    test = frame[in_test].groupby(keys[in_test], sort=False).head(1)  # no repeats in test
    return frame[~in_test].reset_index(drop=True), test.reset_index(drop=True)


def sample_rows(pool: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n rows, stratified (label shares as in the pool), seeded."""
    if n >= len(pool):
        return pool.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    from sklearn.model_selection import train_test_split

    rows, _ = train_test_split(pool, train_size=n, random_state=seed, stratify=pool["label"])
    return rows.reset_index(drop=True)


@dataclass
class Case:
    name: str  # e.g. "davidson" or "polarity->tweets"
    train: pd.DataFrame
    test: pd.DataFrame
    n: int
    seed: int


def _scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    from prefixlab.runs.evaluate import classification_report

    r = classification_report(gold, pred, labels)
    n = len(gold)
    missed = [k for k, v in r["per_class"].items()
              if v["support"] >= MISSED_SHARE * n and v["recall"] == 0]
    return {"macro_f1": r["macro_f1"], "accuracy": r["accuracy"], "missed": missed}


def _apply(config, overrides: dict) -> None:
    """Dotted overrides onto a RunConfig, e.g. {"training.learning_rate": 0.01}."""
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, last):
            raise SystemExit(f"--set {key}: no such setting")
        setattr(target, last, value)
    for part in (config.training, config.prefix, config):  # the checks, with the new values
        part.__post_init__()


@dataclass
class Trained:
    report: dict  # the run's report.json
    prepared: object  # runs.experiment.prepare_data's split of the rows
    config: object  # the RunConfig trained
    seconds: float  # training and its final report


def train_rows(rows: pd.DataFrame, folder: Path, loaded, seed: int, overrides: dict) -> Trained:
    """Train a run in `folder` on `rows` (text, label), written beside it as folder.csv, with
    the recipe under test (`overrides` onto the defaults) and `seed`."""
    from prefixlab.data.writing import csv_text
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data

    csv = folder.with_suffix(".csv")
    # csv_text quotes every cell holding a lone "\r" (sentiment_tweets has 415 such texts); pandas'
    # to_csv writes one bare unless a comma or quote in it forces quotes, and the row breaks.
    csv.write_text(csv_text(rows[["text", "label"]]), encoding="utf-8")
    cfg = RunConfig(train_csv=str(csv), text_column="text", label_column="label")
    cfg.training.seed = seed
    _apply(cfg, overrides)
    prepared = prepare_data(cfg)
    run_folder = create_run(cfg, folder, prepared, loaded)
    began = time.perf_counter()
    report = execute_run(run_folder, loaded, prepared=prepared)
    return Trained(report, prepared, cfg, time.perf_counter() - began)


def run_case(case: Case, loaded, workdir: Path, overrides: dict, zero_cache: dict,
             scores_dir: Path | None = None) -> dict:
    """Train with the default recipe on the case's rows; score everything on its test rows."""
    from prefixlab.engine.balance import (
        CONTENT_FREE,
        LabelRule,
        calibrate,
        content_free_offset,
        fit_offsets,
        fit_prior_scale,
        prior_offset,
    )
    from prefixlab.engine.predict import score_log_likelihoods
    from prefixlab.runs.evaluate import majority_baseline, tfidf_baseline
    from prefixlab.runs.finished import open_run

    folder = workdir / f"{case.name.replace('->', '_to_')}_{case.n}_{case.seed}"
    trained = train_rows(case.train, folder, loaded, case.seed, overrides)
    report, prepared, cfg, train_s = (trained.report, trained.prepared, trained.config,
                                      trained.seconds)
    run = open_run(folder, loaded)
    labels, texts, gold = run.labels, case.test["text"].tolist(), case.test["label"].tolist()
    ll = score_log_likelihoods(loaded.model, run.kv, run.encoder, texts)
    cf = score_log_likelihoods(loaded.model, run.kv, run.encoder, list(CONTENT_FREE))
    train_ids = [labels.index(y) for y in prepared.train.labels]
    prior = prior_offset(train_ids, len(labels))
    # the validation rows the run selected its step on fit the last two rules
    val_ll = score_log_likelihoods(loaded.model, run.kv, run.encoder, prepared.validation.texts)
    val_gold = [labels.index(y) for y in prepared.validation.labels]
    scores = LabelRule(run.encoder.rule.lengths).log_probs  # the run's label scores, no offset
    scale = fit_prior_scale(scores(val_ll), val_gold, prior)
    rules = {"raw": None, "content_free": content_free_offset(cf), "prior": prior,
             "fitted": prior * (1.0 if scale is None else scale),
             "offsets": (prior if scale is None else
                         fit_offsets(scores(val_ll), val_gold, prior))}
    if scores_dir is not None:
        scores_dir.mkdir(parents=True, exist_ok=True)
        np.savez(scores_dir / f"{folder.name}.npz", val_ll=val_ll, val_gold=np.array(val_gold),
                 test_ll=ll, test_gold=np.array([labels.index(y) for y in gold]),
                 labels=np.array(labels), prior=prior,
                 lengths=np.array(run.encoder.rule.lengths or (), dtype=int))
    row = {"case": case.name, "n": case.n, "seed": case.seed, "train_rows": len(case.train),
           "test_rows": len(texts),
           "train_s": train_s, "kept_step": report["kept_step"], "steps": report["steps"],
           "stop_reason": report["stop_reason"], "val_macro_f1": report["macro_f1"]}
    for rule, offset in rules.items():
        pred = [labels[i] for i in calibrate(scores(ll), offset).argmax(1)]
        row[f"prefix_{rule}"] = _scores(gold, pred, labels)
    row["prior_scale"] = scale
    # the recipe's own decision (the run's rule, as predict and the report use it)
    row["prefix"] = _scores(gold, [labels[i] for i in run.encoder.rule.log_probs(ll).argmax(1)],
                              labels)
    row["decision"] = f"{cfg.decision}/{cfg.label_scores}"
    tfidf = tfidf_baseline(case.train["text"].tolist(), case.train["label"].tolist(), texts,
                           case.seed)
    row["tfidf"] = _scores(gold, tfidf, labels)
    row["majority"] = _scores(gold, majority_baseline(case.train["label"].tolist(),
                                                        len(texts)), labels)
    key = (case.name, tuple(labels))
    if key not in zero_cache:
        zero = score_log_likelihoods(loaded.model, None, run.encoder, texts)
        zero_cache[key] = _scores(gold, [labels[i] for i in zero.argmax(1)], labels)
    row["zero_shot"] = zero_cache[key]
    return row


def build_cases(data_dir: Path, sets: Sequence[str], sizes: Sequence[int],
                seeds: Sequence[int], cross: Sequence[str], test_rows: int) -> list[Case]:
    needed = set(sets) | {s for c in cross for s in CROSS[c]}
    splits = {name: fixed_split(load_set(data_dir, name), test_rows) for name in needed}
    cases = []
    for n in sizes:
        for seed in seeds:
            for name in sets:
                pool, test = splits[name]
                cases.append(Case(name, sample_rows(pool, n, seed), test, n, seed))
            for c in cross:
                src, dst = CROSS[c]
                cases.append(Case(f"{src}->{dst}", sample_rows(splits[src][0], n, seed),
                                  splits[dst][1], n, seed))
    return cases


def preset_overrides(name: str) -> dict:
    """A preset (presets.py) as dotted overrides; each case keeps its own seed."""
    parts = config_parts(preset(name))
    del parts["training"]["seed"]
    return {(key if group == "run" else f"{group}.{key}"): value
            for group, values in parts.items() for key, value in values.items()}


def _parse_overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def summarize(rows: list[dict]) -> str:
    """The last line: wins against TF-IDF, mean macro-F1 of each contender, missed classes."""
    def mean(key: str, field: str = "macro_f1") -> float:
        return float(np.mean([r[key][field] for r in rows]))

    wins = sum(r["prefix"]["macro_f1"] > r["tfidf"]["macro_f1"] for r in rows)
    missed = sum(len(r["prefix"]["missed"]) for r in rows)
    return (f"quality: cases={len(rows)} prefix_beats_tfidf={wins}/{len(rows)} "
            f"prefix_f1={mean('prefix'):.3f} raw_f1={mean('prefix_raw'):.3f} "
            f"content_free_f1={mean('prefix_content_free'):.3f} "
            f"prior_f1={mean('prefix_prior'):.3f} tfidf_f1={mean('tfidf'):.3f} "
            f"majority_f1={mean('majority'):.3f} zero_shot_f1={mean('zero_shot'):.3f} "
            f"missed_classes={missed} "
            f"max_train_s={max(r['train_s'] for r in rows):.0f}")


def _fitted(r: dict) -> str:
    """The rules fitted on validation rows (rows written before they existed lack them)."""
    if "prefix_fitted" not in r:
        return ""
    scale = "-" if r["prior_scale"] is None else f"{r['prior_scale']:.1f}"
    return (f", fitted {r['prefix_fitted']['macro_f1']:.3f} at {scale}, offsets "
            f"{r['prefix_offsets']['macro_f1']:.3f}")


def format_row(r: dict) -> str:
    return (f"{r['case']:<18} {r['n']:>5} {r['seed']:>4}  prefix {r['prefix']['macro_f1']:.3f} "
            f"(raw {r['prefix_raw']['macro_f1']:.3f}, "
            f"cf {r['prefix_content_free']['macro_f1']:.3f}, prior "
            f"{r['prefix_prior']['macro_f1']:.3f}{_fitted(r)})  "
            f"tfidf {r['tfidf']['macro_f1']:.3f}  "
            f"majority {r['majority']['macro_f1']:.3f}  zero-shot "
            f"{r['zero_shot']['macro_f1']:.3f}  acc {r['prefix']['accuracy']:.3f}/"
            f"{r['tfidf']['accuracy']:.3f}  {r['train_s']:.0f} s  kept "
            f"{r['kept_step']}/{r['steps']}  val {r['val_macro_f1']:.3f}  "
            f"missed {','.join(r['prefix']['missed']) or '-'}  [{r['stop_reason']}]")


def markdown_table(rows: list[dict]) -> str:
    """One line per (case, rows): each contender's macro-F1 as the mean over seeds (with the
    range when there are several), the recipe's decision beside the raw argmax, times and
    classes missed — the README's table. The better of prefix and TF-IDF is in bold; the
    rows are those a case used (all of a set's pool when asked for more)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["n"]), []).append(r)

    def cell(rs: list[dict], key: str) -> str:
        values = [r[key]["macro_f1"] for r in rs]
        text = f"{np.mean(values):.3f}"
        return text + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")

    out = ["| case | train rows | seeds | prefix (default rule) | prefix, raw argmax | TF-IDF + LR "
           "| majority | zero-shot | prefix > TF-IDF | accuracy prefix / TF-IDF | train s "
           "(mean) | kept step / steps | classes ≥ 5% at zero recall |",
           "|" + "---|" * 13]
    for (case, n), rs in groups.items():
        wins = sum(r["prefix"]["macro_f1"] > r["tfidf"]["macro_f1"] for r in rs)
        missed = sorted({m for r in rs for m in r["prefix"]["missed"]})
        acc = (f"{np.mean([r['prefix']['accuracy'] for r in rs]):.3f} / "
               f"{np.mean([r['tfidf']['accuracy'] for r in rs]):.3f}")
        kept = ", ".join(f"{r['kept_step']}/{r['steps']}" for r in rs)
        used = max(r.get("train_rows", n) for r in rs)
        prefix_wins = (np.mean([r["prefix"]["macro_f1"] for r in rs])
                       >= np.mean([r["tfidf"]["macro_f1"] for r in rs]))
        ours, theirs = cell(rs, "prefix"), cell(rs, "tfidf")
        ours, theirs = (f"**{ours}**", theirs) if prefix_wins else (ours, f"**{theirs}**")
        out.append(f"| {case} | {used} | {len(rs)} | {ours} | "
                   f"{cell(rs, 'prefix_raw')} | {theirs} | {cell(rs, 'majority')} | "
                   f"{cell(rs, 'zero_shot')} | {wins}/{len(rs)} | {acc} | "
                   f"{np.mean([r['train_s'] for r in rs]):.0f} | {kept} | "
                   f"{', '.join(missed) or 'none'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixlab.bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=_default_data_dir())
    parser.add_argument("--sets", default="davidson,polarity,disaster")
    parser.add_argument("--sizes", default="300,2000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cross", default="both",
                        help="both, none, or a comma list of " + ", ".join(CROSS))
    parser.add_argument("--test-rows", type=int, default=1000,
                        help="fixed test rows per set (scoring time grows with it)")
    parser.add_argument("--preset", choices=tuple(CLI_NAMES),
                        help="train with the app's recipe of that name (--set wins over it); "
                             "default: the CLI's defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a RunConfig setting, e.g. training.class_balance=sampled")
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--output", type=Path, help="write every row as JSON here")
    parser.add_argument("--scores", type=Path, metavar="DIR",
                        help="keep each case's label scores (validation and test) here")
    parser.add_argument("--table", type=Path, nargs="+", metavar="ROWS_JSON",
                        help="print the markdown table and summary line of earlier --output "
                             "files (no training)")
    args = parser.parse_args(argv)
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())["rows"]]
        print(markdown_table(rows))
        print(summarize(rows))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from prefixlab.engine.models import DEFAULT_MODEL, load_model

    sets = [s for s in args.sets.split(",") if s]
    unknown = sorted(set(sets) - set(SETS))
    cross = list(CROSS) if args.cross == "both" else [
        c for c in args.cross.split(",") if c and c != "none"]
    unknown += sorted(set(cross) - set(CROSS))
    if unknown:
        raise SystemExit(f"unknown sets or cross cases: {', '.join(unknown)}")
    overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                 **_parse_overrides(args.set)}
    if args.model:  # the runs name the model they train on, as open_run checks
        overrides["model"] = args.model
    cases = build_cases(args.data_dir, sets, [int(x) for x in args.sizes.split(",")],
                        [int(x) for x in args.seeds.split(",")], cross, args.test_rows)
    # one model for every case, in the precision an override asks (--set precision=bfloat16)
    loaded = load_model(args.model or DEFAULT_MODEL, "cpu",
                        precision=str(overrides.get("precision", "auto")))
    rows, zero_cache = [], {}
    print(f"{len(cases)} cases; overrides: {overrides or 'none'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="prefixlab-quality-") as tmp:
        for case in cases:
            rows.append(run_case(case, loaded, Path(tmp), overrides, zero_cache, args.scores))
            print(format_row(rows[-1]), flush=True)
            if args.output:
                args.output.write_text(json.dumps({"overrides": overrides, "rows": rows},
                                                  indent=1, default=float))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
