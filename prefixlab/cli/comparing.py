"""`python -m prefixlab compare`: train several methods on the same rows and print a table.

The run settings come from a preset (or Balanced's recipe on every row, as `train` does) and
the options typed beside it; every method trains with them (runs/compare.py). With
--target-column the comparison generates: BLEU, chrF and ROUGE-L columns, and the bare model.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefixlab.cli.options import stop_strings
from prefixlab.cli.output import say

FIGURES = {"macro_f1": ("macro-F1", ".3f"), "bleu": ("BLEU", ".1f")}
"""How a done event's validation figure is printed, by its name."""


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
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
                  "stop": stop_strings(args)}
    run["generation"] = {**typed["generation"],
                         **{k: v for k, v in generation.items() if v is not None}}
    return RunConfig(train_csv=str(args.csv), prefix=parts["prefix"], training=training, **run)


def _figure(done: dict) -> str:
    """A done event's validation figure: "validation macro-F1 0.812", "validation BLEU 31.4"."""
    name, spec = FIGURES[done["metric"]]
    return f"validation {name} {done['value']:{spec}}"


def cmd_compare(args) -> int:
    from prefixlab.engine.models import load_model, pick_device
    from prefixlab.runs.compare import CompareConfig, check_task, run_comparison
    from prefixlab.runs.verdict import format_table

    compare = CompareConfig(methods=args.methods, test_csv=args.test_csv,
                            shift_csv=args.shift_csv, keep_weights=args.keep_weights)
    cfg = _config(args)  # these three refuse bad settings and methods before the model loads
    check_task(cfg, compare)
    methods = compare.methods_for(cfg)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output")
    loaded = load_model(cfg.model, pick_device(cfg.device), trust_remote_code=cfg.trust_remote_code,
                        progress=say, precision=cfg.precision)
    budget = f"{cfg.training.max_minutes:g} min" if cfg.training.max_minutes else "none"
    say(f"comparing {', '.join(methods)} on {loaded.name} ({loaded.device}, "
        f"{loaded.precision}); time budget per method: {budget}")

    def heard(event: dict) -> None:
        if event["state"] == "training" and event["step"] and event["step"] % 20:
            return
        detail = {"training": lambda: (f"step {event['step']}/{event['total_steps']}"
                                       if event["step"] else "started"),
                  "done": lambda: _figure(event),
                  "failed": lambda: event["error"]}.get(event["state"], lambda: "")()
        say(f"[{event['method']}] {event['state']} {detail}".rstrip())

    result = run_comparison(cfg, compare, output, loaded, on_event=heard)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(format_table(result["rows"], result["task"], result.get("bare_model")))
    print()
    for sentence in result["verdict"]:
        print(f"- {sentence}")
    for row in result["rows"]:
        if "error" not in row:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            print(f"{row['title']}: {settings}")
    print(f"\nwritten: {output / 'comparison.json'}")
    return 0
