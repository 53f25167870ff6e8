"""`python -m prefixlab compare`: train several methods on the same rows and print a table.

The run settings come from a preset (or Balanced's recipe on every row, as `train` does) and
the options typed beside it; every method trains with them (runs/compare.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefixlab.cli.output import say


def _config(args):
    from dataclasses import fields

    from prefixlab.cli.options import dotted_settings
    from prefixlab.errors import ConfigError
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.presets import config_parts, preset

    parts = config_parts(preset(args.preset)) if args.preset else {
        "run": {}, "prefix": {}, "training": {}}
    typed = dotted_settings(args.set)  # --set wins over the preset, the named options over both
    unknown = sorted(set(typed["run"]) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise ConfigError(f"--set: no run setting named {', '.join(unknown)}")
    for section in ("prefix", "training"):
        parts[section] = {**parts[section], **typed[section]}
    if typed["generation"]:
        parts["generation"] = {**parts.get("generation", {}), **typed["generation"]}
    run = {**parts["run"], **typed["run"], "text_column": args.text_column,
           "label_column": args.label_column, "target_column": args.target_column}
    for name in ("model", "device", "precision", "max_train_examples", "validation_csv"):
        if getattr(args, name) is not None:
            run[name] = getattr(args, name)
    training = dict(parts["training"])
    if args.max_minutes is not None:
        training["max_minutes"] = args.max_minutes
    if args.seed is not None:
        training["seed"] = args.seed
    if args.epochs is not None:
        training["epochs"] = args.epochs
    if "generation" in parts:
        run["generation"] = parts["generation"]
    return RunConfig(train_csv=str(args.csv), prefix=parts["prefix"], training=training, **run)


def cmd_compare(args) -> int:
    from prefixlab.engine.models import load_model, pick_device
    from prefixlab.runs.compare import CompareConfig, run_comparison
    from prefixlab.runs.verdict import format_table

    compare = CompareConfig(methods=args.methods, test_csv=args.test_csv,
                            shift_csv=args.shift_csv, keep_weights=args.keep_weights)
    cfg = _config(args)  # both refuse bad settings and method names before the model loads
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output")
    loaded = load_model(cfg.model, pick_device(cfg.device), trust_remote_code=cfg.trust_remote_code,
                        progress=say, precision=cfg.precision)
    budget = f"{cfg.training.max_minutes:g} min" if cfg.training.max_minutes else "none"
    say(f"comparing {', '.join(compare.methods)} on {loaded.name} ({loaded.device}, "
        f"{loaded.precision}); time budget per method: {budget}")

    def heard(event: dict) -> None:
        if event["state"] == "training" and event["step"] and event["step"] % 20:
            return
        detail = {"training": lambda: (f"step {event['step']}/{event['total_steps']}"
                                       if event["step"] else "started"),
                  "done": lambda: f"validation macro-F1 {event['macro_f1']:.3f}",
                  "failed": lambda: event["error"]}.get(event["state"], lambda: "")()
        say(f"[{event['method']}] {event['state']} {detail}".rstrip())

    result = run_comparison(cfg, compare, output, loaded, on_event=heard)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(format_table(result["rows"]))
    print()
    for sentence in result["verdict"]:
        print(f"- {sentence}")
    for row in result["rows"]:
        if "error" not in row:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            print(f"{row['title']}: {settings}")
    print(f"\nwritten: {output / 'comparison.json'}")
    return 0
