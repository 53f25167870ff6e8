"""The inspection benchmark: how much of what a trained prefix does its readouts recover.

    python -m prefixlab.bench.inspection [--data-dir ../shared/data]
        [--sets davidson,polarity,disaster,tweets] [--sizes 300] [--seeds 0]
        [--preset quick|balanced|thorough] [--set KEY=VALUE ...]
        [--readable-tokens 16] [--readable-steps 60] [--readable-seconds 60]
        [--knockout-rows 40]
        [--keep DIR | --reread DIR] [--output inspection.json]
    python -m prefixlab.bench.inspection --table inspection.json [more.json ...]

Each case trains the recipe under test on a seeded, stratified sample of one shared set
(bench.quality's rows), then reads the run as a user would:
- the readable prompt (runs.readable): a text of N tokens searched on the run's training
  rows, scored on its validation rows beside the start text and the nearest-token text of
  the same length: agreement with the prefix's decisions and macro-F1 against the gold
  labels, and the seconds the whole call took;
- the hiding knockout on `--knockout-rows` validation rows and the attention on a few
  training texts: is a slot flagged as an attention sink (interpret.ablation)?
- the model's own descriptions of its prefix (interpret.describe): how many name the task
  or a label word, and how many name one the start's description does not.

--keep DIR keeps the trained runs there; --reread DIR reads the runs an earlier --keep left
(no training: the readouts again, e.g. after a change to one of them).

The issue's goals are printed against the figures: agreement >= 0.8 on polarity and
disaster, and the readable prompt above the start text's macro-F1 on every set. The last
line, `inspection: ...`, is for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from prefixlab.bench.quality import (
    SETS,
    Case,
    _default_data_dir,
    _parse_overrides,
    build_cases,
    preset_overrides,
    train_rows,
)
from prefixlab.runs.presets import CLI_NAMES
from prefixlab.runs.readable import SEARCH_SECONDS

AGREEMENT_GOAL = 0.8
AGREEMENT_SETS = ("polarity", "disaster")


def run_case(case: Case, loaded, workdir: Path, overrides: dict, tokens: int, steps: int,
             knockout_rows: int, trained: bool = False, seconds: float = 0.0) -> dict:
    """Train on the case's rows (unless `trained`: its run is in workdir already), then take
    every readout of the issue from the run. seconds: the readable search's budget (0: none);
    a rerun keeps the knockout an earlier one of as many rows wrote."""
    from prefixlab.interpret.describe import beyond_start, naming_count
    from prefixlab.interpret.readable import SearchConfig
    from prefixlab.runs.explanation import describe_run
    from prefixlab.runs.finished import open_run
    from prefixlab.runs.inspection import inspect_run, run_start
    from prefixlab.runs.readable import readable_prompt, run_nearest

    folder = workdir / f"{case.name}_{case.n}_{case.seed}"
    if trained:
        report, train_s = json.loads((folder / "report.json").read_text()), None
    else:
        done = train_rows(case.train, folder, loaded, case.seed, overrides)
        report, train_s = done.report, done.seconds
    row = {"case": case.name, "n": case.n, "seed": case.seed, "train_s": train_s,
           "val_macro_f1": report["macro_f1"]}

    run = open_run(folder, loaded)
    began = time.perf_counter()
    found = readable_prompt(run, run_nearest(run), tokens,
                            SearchConfig(steps=steps, seconds=seconds or None))
    row["readable"] = found.to_json()
    row["readable_s"] = time.perf_counter() - began

    began = time.perf_counter()
    out = workdir / f"{folder.name}-inspect"
    kept = json.loads((out / "knockout.json").read_text()) if (
        trained and (out / "knockout.json").is_file()) else {}
    if knockout_rows and kept.get("rows") == knockout_rows:
        knockout = kept
    else:
        inspect_run(folder, out, loaded, knockout_rows=knockout_rows, ablations=("hide",))
        knockout = json.loads((out / "knockout.json").read_text()) if knockout_rows else {}
    row["sinks"] = knockout.get("attention_sinks", [])
    row["knockout_rows"] = knockout_rows
    row["inspect_s"] = time.perf_counter() - began

    described = describe_run(run, run_start(run).kv)
    row["described"] = {"named": naming_count(described), "beyond_start": beyond_start(described),
                        "total": len(described),
                        "texts": [d.to_json() for d in described]}
    return row


def _baseline(row: dict, name: str) -> dict:
    return row["readable"]["baselines"].get(name) or {}


def markdown_table(rows: list[dict]) -> str:
    """One line per run: the readable prompt beside its two baselines (agreement / macro-F1
    on the run's validation rows), the prefix's own macro-F1 there, the sinks and the
    descriptions that name the task."""
    out = ["| set | rows | seed | prefix F1 | readable: agree / F1 | start text: agree / F1 | "
           "nearest tokens: agree / F1 | readable, no label bias | start, no label bias | "
           "readable s (steps) | sink slots | descriptions naming (beyond start) |",
           "|" + "---|" * 12]
    for r in rows:
        rp = r["readable"]
        start, near = _baseline(r, "start_text"), _baseline(r, "nearest_tokens")

        def pair(d: dict | None) -> str:
            return f"{d['agreement']:.2f} / {d['macro_f1']:.3f}" if d else "—"

        sinks = ", ".join(f"P{s['slot']}" for s in r["sinks"]) or "none"
        d = r["described"]
        out.append(f"| {r['case']} | {r['n']} | {r['seed']} | {rp['prefix_macro_f1']:.3f} | "
                   f"{pair(rp)} | {pair(start)} | {pair(near)} | {pair(rp.get('without_bias'))} | "
                   f"{pair(start.get('without_bias'))} | {r['readable_s']:.0f} ({rp['steps']}) | "
                   f"{sinks} | {d['named']} of {d['total']} ({d['beyond_start']}) |")
    return "\n".join(out)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each against its figures."""
    out = []
    for name in AGREEMENT_SETS:
        values = [r["readable"]["agreement"] for r in rows if r["case"] == name]
        if values:
            met = min(values) >= AGREEMENT_GOAL
            out.append(f"agreement >= {AGREEMENT_GOAL} on {name}: "
                       f"{'met' if met else 'missed'} ({', '.join(f'{v:.2f}' for v in values)})")
    for name in dict.fromkeys(r["case"] for r in rows):
        pairs = [(r["readable"]["macro_f1"], _baseline(r, "start_text").get("macro_f1"))
                 for r in rows if r["case"] == name]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if pairs:
            met = all(a > b for a, b in pairs)
            out.append(f"readable above the start text's macro-F1 on {name}: "
                       f"{'met' if met else 'missed'} ("
                       + ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in pairs) + ")")
    return out


def summarize(rows: list[dict]) -> str:
    def mean(values) -> float:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    above = sum(r["readable"]["macro_f1"] > _baseline(r, "start_text").get("macro_f1", 1.0)
                for r in rows)
    named = sum(r["described"]["named"] for r in rows)
    beyond = sum(r["described"]["beyond_start"] for r in rows)
    total = sum(r["described"]["total"] for r in rows)
    return (f"inspection: runs={len(rows)} "
            f"readable_agreement={mean(r['readable']['agreement'] for r in rows):.3f} "
            f"readable_f1={mean(r['readable']['macro_f1'] for r in rows):.3f} "
            f"start_f1={mean(_baseline(r, 'start_text').get('macro_f1') for r in rows):.3f} "
            f"nearest_f1={mean(_baseline(r, 'nearest_tokens').get('macro_f1') for r in rows):.3f} "
            f"prefix_f1={mean(r['readable']['prefix_macro_f1'] for r in rows):.3f} "
            f"above_start={above}/{len(rows)} "
            f"sink_share={mean(bool(r['sinks']) for r in rows):.2f} "
            f"named={named}/{total} beyond_start={beyond}/{total} "
            f"readable_s={mean(r['readable_s'] for r in rows):.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixlab.bench.inspection",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=_default_data_dir())
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--sizes", default="300")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--test-rows", type=int, default=300,
                        help="rows each set keeps out of the pool its samples come from")
    parser.add_argument("--preset", choices=tuple(CLI_NAMES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--readable-tokens", type=int, default=16)
    parser.add_argument("--readable-steps", type=int, default=60)
    parser.add_argument("--readable-seconds", type=float, default=SEARCH_SECONDS,
                        help="the search's time budget, as the app's default (0: none)")
    parser.add_argument("--knockout-rows", type=int, default=40)
    parser.add_argument("--model")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, metavar="DIR", help="keep the trained runs here")
    where.add_argument("--reread", type=Path, metavar="DIR",
                       help="read the runs an earlier --keep left here, without training")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="ROWS_JSON")
    args = parser.parse_args(argv)
    if args.table:
        rows = [r for path in args.table for r in json.loads(path.read_text())["rows"]]
    else:
        rows = measure(args)
    print(markdown_table(rows))
    print("\n".join(goals(rows)))
    print(summarize(rows))
    return 0


def measure(args: argparse.Namespace) -> list[dict]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prefixlab.engine.models import DEFAULT_MODEL, load_model

    sets = [s for s in args.sets.split(",") if s]
    if unknown := sorted(set(sets) - set(SETS)):
        raise SystemExit(f"unknown sets: {', '.join(unknown)} (known: {', '.join(SETS)})")
    overrides = {**(preset_overrides(args.preset) if args.preset else {}),
                 **_parse_overrides(args.set)}
    if args.model:  # the runs name the model they train on, as open_run checks
        overrides["model"] = args.model
    cases = build_cases(args.data_dir, sets, [int(x) for x in args.sizes.split(",")],
                        [int(x) for x in args.seeds.split(",")], [], args.test_rows)
    loaded = load_model(args.model or DEFAULT_MODEL, "cpu",
                        precision=str(overrides.get("precision", "auto")))
    print(f"{len(cases)} runs; overrides: {overrides or 'none'}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prefixlab-inspection-") as tmp:
        workdir = args.reread or args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for case in cases:
            row = run_case(case, loaded, workdir, overrides, args.readable_tokens,
                           args.readable_steps, args.knockout_rows, trained=bool(args.reread),
                           seconds=args.readable_seconds)
            rows.append(row)
            rp = row["readable"]
            print(f"{row['case']:<9} {row['n']:>5} seed {row['seed']}  prefix "
                  f"{rp['prefix_macro_f1']:.3f}  readable {rp['agreement']:.2f}/"
                  f"{rp['macro_f1']:.3f}  {rp['text']!r}  sinks {len(row['sinks'])}  named "
                  f"{row['described']['named']}/{row['described']['total']}  train "
                  f"{row['train_s'] or 0:.0f} s, readable {row['readable_s']:.0f} s", flush=True)
            if args.output:
                args.output.write_text(json.dumps({"overrides": overrides, "rows": rows},
                                                  indent=1, default=float))
    return rows


if __name__ == "__main__":
    sys.exit(main())
