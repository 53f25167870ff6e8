"""Commands that move a prefix in or out of a run folder: export (PEFT or safetensors),
import-peft, and inspect (a prefix's readouts as JSON files, a summary and an HTML page; the
model's descriptions of its prefix; the words that move its decisions beside TF-IDF's; a
readable prompt that decides as the prefix does)."""

from __future__ import annotations

import json
from pathlib import Path

from prefixlab.cli.options import given
from prefixlab.cli.output import say
from prefixlab.data.reading import DataError


def cmd_export(args) -> int:
    from prefixlab.engine.models import PrefixShape, model_provenance, portable_model_id
    from prefixlab.engine.peft_interop import export_peft
    from prefixlab.engine.prefix import load_prefix
    from prefixlab.runs.folder import RunFolder

    folder = RunFolder(args.run)
    info = folder.read_config()
    m = info["model"]
    shape = PrefixShape(m["num_layers"], m["num_kv_heads"], m["head_dim"])
    kv = load_prefix(folder.prefix_path, shape).kv
    if args.format == "peft":
        from prefixlab.engine.models import load_model

        config = load_model(info["run"]["model"], "cpu").model.config
        export_peft(kv, config, args.output, portable_model_id(info["run"]["model"]),
                    notes=model_provenance(info["run"]["model"]))
    else:
        import shutil

        Path(args.output).mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder.prefix_path, Path(args.output) / "prefix.safetensors")
        shutil.copy2(folder.config_path, Path(args.output) / "config.json")
    print(f"exported {args.format} prefix to {args.output}")
    return 0


def cmd_import_peft(args) -> int:
    """A run folder from a PEFT prefix-tuning adapter, ready for predict and evaluate."""
    from dataclasses import replace

    from prefixlab.engine.models import load_model
    from prefixlab.engine.peft_interop import import_peft
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import import_run
    from prefixlab.runs.folder import RunFolder

    labels = sorted({x.strip() for x in args.labels.split(",") if x.strip()})
    if len(labels) < 2:
        raise DataError("--labels needs at least two comma-separated labels")
    folder = RunFolder(args.output)
    if folder.path.exists() and any(folder.path.iterdir()):
        raise FileExistsError(f"{folder.path} already exists and is not empty")
    cfg = RunConfig(train_csv="", **given(args, args.setting_names))  # checked before loading
    loaded = load_model(cfg.model, "cpu", progress=say)
    kv = import_peft(args.adapter, loaded.model.config)
    cfg = replace(cfg, prefix={"prefix_length": kv.shape[3]})
    import_run(cfg, folder.path, labels, loaded, kv, imported_from=str(args.adapter))
    print(f"imported a {kv.shape[3]}-token PEFT prefix into {folder.path}")
    return 0


def _explain_inspect(args, loaded, out: Path) -> None:
    """The model's descriptions of the prefix and (with --explain-rows) the words that move
    its decisions beside TF-IDF's: printed, and written as descriptions.json / words.json."""
    from prefixlab.interpret.describe import CAVEAT, beyond_start, naming_count
    from prefixlab.runs.explanation import describe_run, word_agreement
    from prefixlab.runs.finished import open_run
    from prefixlab.runs.inspection import run_start

    run = open_run(args.run, loaded)
    if args.describe:
        say("the model describes its prefix (greedy, per layer range)")
        described = describe_run(run, run_start(run).kv)
        (out / "descriptions.json").write_text(json.dumps(
            [d.to_json() for d in described], indent=1, ensure_ascii=False))
        print(f"the model describes its prefix: {naming_count(described)} of {len(described)} "
              f"descriptions name the task or a label, {beyond_start(described)} of them "
              f"beyond what the start's description names ({CAVEAT})")
        for d in described:
            print(f"  [layers {d.layers}] {d.prompt} … {d.text!r}"
                  + (f"  names: {', '.join(d.named)}" if d.named else ""))
    if args.explain_rows and not run.is_generation:
        agreement = word_agreement(run, args.explain_rows, progress=say)
        (out / "words.json").write_text(json.dumps(agreement.to_json(), indent=1,
                                                   ensure_ascii=False))
        print("\n".join(agreement.lines()))


def _readable_inspect(args, loaded, out: Path) -> None:
    """A text prompt that decides as the prefix does, beside the start text and the
    nearest-token text: printed, and written as readable_prompt.json."""
    from prefixlab.interpret.readable import SearchConfig
    from prefixlab.runs.finished import open_run
    from prefixlab.runs.readable import readable_prompt, run_nearest, write_readable

    run = open_run(args.run, loaded)
    nearest = run_nearest(run, args.top_k, args.bank_size, progress=say)
    found = readable_prompt(run, nearest, args.readable_tokens,
                            SearchConfig(steps=args.readable_steps,
                                         seconds=args.readable_seconds or None), progress=say)
    write_readable(found, out)
    print("\n".join(found.lines()))


def cmd_inspect(args) -> int:
    from prefixlab.engine.models import load_model
    from prefixlab.runs.folder import RunFolder
    from prefixlab.runs.inspection import inspect_run

    cfg = RunFolder(args.run).run_config()
    loaded = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code,
                        precision=args.precision or cfg.precision, progress=say)
    ablations = ("hide", "reset") if args.ablation == "both" else (args.ablation,)
    out = inspect_run(args.run, args.output, loaded, args.top_k, texts=args.text or None,
                      bank_size=args.bank_size, knockout_rows=args.knockout_rows,
                      knockout_precision=args.knockout_precision, ablations=ablations,
                      progress=say)
    # The summary's first two lines: what training changed, what still reads as the start.
    print("\n".join((out / "summary.md").read_text().split("\n\n")[:2]))
    if args.describe or args.explain_rows:
        _explain_inspect(args, loaded, out)
    if args.readable_prompt:
        _readable_inspect(args, loaded, out)
    written = ", ".join(sorted(p.name for p in out.iterdir()
                               if p.suffix in (".json", ".html", ".md")))
    print(f"wrote {written} to {out}")
    return 0
