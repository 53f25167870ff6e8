"""The command line: `python -m prefixlab <command>`, on the same functions the app calls.

Exit codes: 0 success; 2 a user error (bad file, bad setting), with one line on stderr;
1 an unexpected failure. No traceback for user errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from prefixlab.cli.options import add_options, given
from prefixlab.data import tables as datamod
from prefixlab.errors import USER_ERRORS
from prefixlab.runs.presets import CLI_NAMES


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not sys.stderr.isatty())

    def on_step(s) -> None:
        bar.total = s.total_steps
        bar.update(s.step - bar.n)
        bar.set_postfix(loss=f"{s.loss:.3f}", ex_s=f"{s.examples_per_s:.1f}")
        if not sys.stderr.isatty() and (s.step % 10 == 0 or s.step == s.total_steps):
            _say(f"step {s.step}/{s.total_steps} loss {s.loss:.4f} "
                 f"{s.examples_per_s:.1f} ex/s eta {s.eta_s:.0f}s")

    return bar, on_step


def _metrics_line(name: str, m: dict | None) -> str:
    if not m:
        return f"  {name:<10} (not available)"
    if "bleu" in m:
        return (f"  {name:<10} BLEU {m['bleu']:.1f}  ROUGE-L {m['rouge_l']:.1f}  "
                f"chrF {m['chrf']:.1f}  loss {m['loss']:.3f}")
    return f"  {name:<10} accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"


def _print_report(report: dict) -> None:
    """The prefix beside every baseline, then any warning about its predictions."""
    if report.get("task") == "generation":
        print(_metrics_line("prefix", report))
        print(_metrics_line("bare model", report["baselines"]["bare_model"]))
        return
    print(_metrics_line("prefix", report))
    for key, name in (("majority", "majority"), ("zero_shot", "zero-shot"), ("tfidf", "tf-idf")):
        print(_metrics_line(name, report["baselines"].get(key)))
    for w in report.get("warnings", []):
        print(f"warning: {w}")


def _results_header(report: dict) -> str:
    if report.get("task") == "generation":
        return (f"held-out results on {report['n']} distinct inputs ({report['rows']} "
                "references):")
    return f"held-out results on {report['n']} rows:"


def _stop_strings(args) -> list[str] | None:
    """--stop values, with the escapes a shell makes hard to type ("\\n", "\\t") read."""
    stops = [x.replace("\\n", "\n").replace("\\t", "\t") for x in getattr(args, "stop", [])]
    return stops or None


def cmd_validate(args) -> int:
    data = datamod.load_labeled_csv(args.csv, args.text_column, args.label_column)
    print(f"{args.csv}: {len(data)} usable rows, text column {data.text_column!r}, "
          f"label column {data.label_column!r}")
    for label, count in sorted(data.label_counts().items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {count}")
    for w in data.warnings:
        print(f"warning: {w}")
    return 0


def _run_config(args):
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.presets import config_parts, preset

    names = args.setting_names
    # a preset fills the settings it names; the options typed beside it win over it
    base = config_parts(preset(args.preset)) if args.preset else {
        "run": {}, "prefix": {}, "training": {}}
    prefix = {**base["prefix"], **given(args, names["prefix"])}
    if prefix.get("init_text"):
        prefix["init"] = "text"  # --init-text implies a text init, whatever --init says
    # dicts: RunConfig builds the parts and reports every problem of all of them at once
    generation = given(args, names["generation"])
    if _stop_strings(args):
        generation["stop"] = _stop_strings(args)
    return RunConfig(train_csv=str(args.csv), prefix=prefix,
                     training={**base["training"], **given(args, names["training"])},
                     generation=generation, **{**base["run"], **given(args, names["run"])})


def cmd_train(args) -> int:
    from prefixlab.engine import distributed
    from prefixlab.engine.models import describe_model, load_model, pick_device
    from prefixlab.runs.folder import RunFolder

    cfg = _run_config(args)
    ranks = distributed.Ranks.from_env()
    if ranks is not None:  # one of the processes `torchrun ... -m prefixlab train` started
        device = distributed.rank_device(cfg.device, ranks)
        distributed.start(device)
        try:
            if ranks.rank == 0:
                _create(cfg, Path(args.output), lambda: describe_model(
                    cfg.model, trust_remote_code=cfg.trust_remote_code, progress=_say),
                    f"{ranks.world_size} processes")
            distributed.barrier()  # the run folder exists before any rank reads it
            return _execute_rank(RunFolder(args.output), device, resume=False, claim=True)
        finally:
            distributed.stop()
    device = pick_device(cfg.device)
    processes = distributed.process_count(cfg.nproc, device)
    if processes > 1:
        folder, _, _ = _create(cfg, Path(args.output), lambda: describe_model(
            cfg.model, trust_remote_code=cfg.trust_remote_code, progress=_say),
            f"{processes} processes on {device.type}")
        return _launch(folder, processes, resume=False)
    folder, prepared, loaded = _create(cfg, Path(args.output), lambda: load_model(
        cfg.model, device, trust_remote_code=cfg.trust_remote_code, progress=_say), str(device))
    return _execute(folder, loaded, prepared, resume=False)


def _create(cfg, output: Path, model, where: str):
    """Check the output folder and the data, then write the run folder; `model()` gives the
    base model (or its ModelInfo: no weights are needed to describe a run)."""
    from prefixlab.runs.experiment import create_run, prepare_data

    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output")
    prepared = prepare_data(cfg)  # refuses bad data before anything is written
    for w in prepared.warnings:
        _say(f"warning: {w}")
    loaded = model()
    folder = create_run(cfg, output, prepared, loaded)
    info = folder.read_config()
    p = info["prefix"]
    rows = f"{len(prepared.train)} train / {len(prepared.validation)} validation rows"
    if cfg.is_generation:
        rows += (f" ({prepared.train.distinct_inputs()} / "
                 f"{prepared.validation.distinct_inputs()} distinct inputs)")
    _say(f"training a {cfg.prefix.prefix_length}-token prefix on {loaded.name} ({where}): "
         f"{p['trainable_parameters']:,} trainable parameters = {p['share_of_model']:.4%} of "
         f"the model's {info['model']['parameters']:,}; {rows}")
    return folder, prepared, loaded


def _launch(folder, processes: int, resume: bool) -> int:
    """Train the run in `folder` on `processes` ranks started by torch's launcher here. This
    process holds the run lock for them (rank 0 writes), and records a failure after they
    are all gone."""
    from prefixlab.runs.folder import CANCEL_FILE
    from prefixlab.runs.locks import RunLock
    from prefixlab.runs.worker import launch_ranks

    with RunLock.claim(folder.path):
        (folder.path / CANCEL_FILE).unlink(missing_ok=True)  # an old request from the app
        if launch_ranks(folder, processes, resume) == 0:
            return 0
    _say(f"error: {folder.status().get('error')}; the other workers were stopped")
    if folder.checkpoint_path.is_file():
        _say(f"the last checkpoint is kept: continue with `python -m prefixlab resume "
             f"{folder.path}`")
    return 1


def _execute_rank(folder, device, resume: bool, claim: bool) -> int:
    """One rank's share of training the run in `folder` (the process group is started)."""
    from prefixlab.engine.models import load_model

    cfg = folder.run_config()
    loaded = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code)
    return _execute(folder, loaded, None, resume=resume, claim=claim)


def _execute(folder, loaded, prepared, resume: bool, claim: bool = True) -> int:
    """Train here. `claim`: take the run lock; False in ranks whose launcher holds it (the
    app's worker or `train --nproc`), which also stop when the app asks to cancel."""
    from prefixlab.engine import distributed
    from prefixlab.engine.balance import describe_decision
    from prefixlab.runs.experiment import execute_run
    from prefixlab.runs.folder import CANCEL_FILE
    from prefixlab.runs.locks import RunLock

    writer = distributed.is_writer()
    # The run lock makes this process the run's only writer (an app's worker on the same
    # folder is refused, and the app does not take this run for a dead one). Under torchrun
    # rank 0 writes, and holds it unless its launcher (train --nproc, the worker) does.
    lock = RunLock.claim(folder.path) if claim and writer else contextlib.nullcontext()
    with lock:
        bar, on_step = _progress_bar(0)
        try:
            report = execute_run(folder, loaded, prepared=prepared, on_step=on_step,
                                 resume=resume, should_stop=None if claim else
                                 (folder.path / CANCEL_FILE).exists)
        except BaseException as e:
            if writer:
                folder.set_status("failed" if not isinstance(e, KeyboardInterrupt)
                                  else "cancelled", error=str(e))
            raise
        finally:
            bar.close()
    if not writer:
        return 0
    if report is None:
        _say(f"stopped; last checkpoint kept in {folder.path}")
        # a rank's launcher would take a non-zero exit for a failure; the status says cancelled
        return 1 if claim else 0
    print(f"run saved to {folder.path}")
    print(f"kept step {report['kept_step']} of {report['steps']} ({report['selection']}); "
          f"training ended: {report['stop_reason']}")
    if decision := describe_decision(report):
        print(decision)
    print(_results_header(report))
    _print_report(report)
    return 0


def cmd_resume(args) -> int:
    from prefixlab.engine import distributed
    from prefixlab.engine.models import load_model, pick_device
    from prefixlab.runs.folder import RunFolder

    folder = RunFolder(args.run)
    cfg = folder.run_config()
    ranks = distributed.Ranks.from_env()
    if ranks is not None:  # `torchrun ... -m prefixlab resume RUN`
        return _rank_main(folder, cfg, ranks, resume=True, claim=True)
    device = pick_device(cfg.device)
    processes = distributed.process_count(args.nproc or cfg.nproc, device)
    if processes > 1:
        return _launch(folder, processes, resume=True)
    loaded = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                        progress=_say)
    return _execute(folder, loaded, None, resume=True)


def _rank_main(folder, cfg, ranks, resume: bool, claim: bool) -> int:
    from prefixlab.engine import distributed

    device = distributed.rank_device(cfg.device, ranks)
    distributed.start(device)
    try:
        return _execute_rank(folder, device, resume, claim)
    finally:
        distributed.stop()


def cmd_rank(args) -> int:
    """One rank of a data-parallel run; its launcher (train/resume --nproc, the app's
    worker) reads why it failed from torch elastic's error file, written here."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from prefixlab.engine import distributed
    from prefixlab.runs.folder import RunError, RunFolder

    ranks = distributed.Ranks.from_env()
    if ranks is None:
        raise RunError("`rank` is one process of a data-parallel run, started by torch's "
                       "launcher: use `train --nproc N` or `resume` instead")
    handler = get_error_handler()
    try:
        folder = RunFolder(args.run)
        return _rank_main(folder, folder.run_config(), ranks, args.resume, claim=False)
    except Exception as e:
        handler.record_exception(e)
        raise


def cmd_evaluate(args) -> int:
    from prefixlab.runs.finished import evaluate_csv, open_run

    run = open_run(args.run)
    if run.is_generation:
        report = _evaluate_generation(run, args)
    else:
        report = evaluate_csv(run, args.csv, args.text_column, args.label_column)
    if args.json:
        print(json.dumps(report))
    else:
        print(_results_header(report))
        _print_report(report)
    return 0


def _evaluate_generation(run, args) -> dict:
    """Every distinct input of the CSV generated once (its rows are its references)."""
    from prefixlab.runs.generation import evaluate_pairs_csv

    return evaluate_pairs_csv(run.loaded.model, run.encoder, run.kv, run.config, args.csv,
                              args.text_column, args.target_column,
                              _decode_settings(args), max_inputs=args.max_inputs)


def _decode_settings(args) -> dict:
    """Decoding options given on the command line (the run's own settings fill the rest)."""
    given_ = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
              "stop": _stop_strings(args)}
    return {k: v for k, v in given_.items() if v is not None}


def cmd_predict(args) -> int:
    from prefixlab.engine.predict import generate
    from prefixlab.runs.finished import open_run, predict_table

    if not args.text and not args.csv:
        raise datamod.DataError("give --text TEXT (repeatable) or --csv IN --output OUT")
    runs = ([args.run] if args.run else []) + args.runs
    if not runs:
        raise datamod.DataError("name a run folder: predict RUN or --run RUN (repeatable)")
    if len(runs) > 1:
        return _predict_many(args, runs)
    run = open_run(runs[0])
    if run.is_generation:
        from prefixlab.engine.decode import DecodeConfig

        settings = {**run.config.to_dict()["generation"], **_decode_settings(args)}
        run.config.generation = DecodeConfig(**settings)
        for out in run.generate(args.text):
            print(out)
    elif args.generate:
        new = args.max_new_tokens or 40
        for text, out in zip(args.text, generate(run.loaded.model, run.loaded.tokenizer, run.kv,
                                                 args.text, new), strict=True):
            print(json.dumps({"text": text, "generated": out}))
        return 0
    if args.text and not run.is_generation:
        probs = run.score(args.text)
        for text, row in zip(args.text, probs, strict=True):
            ranked = dict(sorted(zip(run.labels, map(float, row), strict=True),
                                 key=lambda kv: -kv[1]))
            print(json.dumps({"text": text, "label": next(iter(ranked)),
                              "probabilities": ranked}))
    if args.csv:
        if not args.output:
            raise datamod.DataError("--csv needs --output OUT.csv")
        frame = predict_table(run, args.csv, args.text_column)
        datamod.write_csv(frame, args.output)
        what = "generations" if run.is_generation else "predictions"
        _say(f"wrote {len(frame)} {what} to {args.output}")
    return 0


def _predict_many(args, runs: list[str]) -> int:
    """Several runs at once: every text is read under every prefix in shared mixed batches."""
    from prefixlab.engine.decode import mixed_generate
    from prefixlab.engine.mixed import mixed_score_labels
    from prefixlab.engine.models import load_model
    from prefixlab.runs.finished import text_column_of
    from prefixlab.runs.folder import RunFolder
    from prefixlab.serve.batcher import predict_frame
    from prefixlab.serve.store import PrefixStore

    cfg = RunFolder(runs[0]).run_config()
    loaded = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code,
                        progress=_say)
    store = PrefixStore(loaded)
    prefixes = [store.get(str(r)) for r in runs]  # refuses a run of another base model
    if args.generate:
        pairs = [(p, t) for p in prefixes for t in args.text]
        outs = mixed_generate(loaded.model, loaded.tokenizer, [p.kv for p, _ in pairs],
                              [t for _, t in pairs], args.max_new_tokens or 40)
        for (p, text), out in zip(pairs, outs, strict=True):
            print(json.dumps({"run": p.key, "text": text, "generated": out}))
        return 0
    if args.text:
        pairs = [(p, t) for p in prefixes for t in args.text]
        probs = mixed_score_labels(loaded.model, [p.score_item(t) for p, t in pairs])
        for (p, text), row in zip(pairs, probs, strict=True):
            ranked = dict(sorted(zip(p.labels, map(float, row), strict=True),
                                 key=lambda kv: -kv[1]))
            print(json.dumps({"run": p.key, "text": text, "label": next(iter(ranked)),
                              "probabilities": ranked}))
    if args.csv:
        if not args.output:
            raise datamod.DataError("--csv needs --output OUT.csv")
        frame = datamod.read_table(args.csv).frame
        column = text_column_of(frame, args.text_column or prefixes[0].text_column, args.csv,
                                guess=not args.text_column)
        out = predict_frame(loaded, prefixes, frame, column)
        datamod.write_csv(out, args.output)
        _say(f"wrote {len(out)} predictions under {len(prefixes)} prefixes to {args.output}")
    return 0


def cmd_serve(args) -> int:
    """Serve the public API alone (no UI) over a data directory's runs."""
    from prefixlab.ui.api import serve_api

    serve_api(args.data_dir, args.model, args.host, args.port, args.auth,
              window_ms=args.window_ms, max_rows=args.max_rows)
    return 0


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
        raise datamod.DataError("--labels needs at least two comma-separated labels")
    folder = RunFolder(args.output)
    if folder.path.exists() and any(folder.path.iterdir()):
        raise FileExistsError(f"{folder.path} already exists and is not empty")
    cfg = RunConfig(train_csv="", **given(args, args.setting_names))  # checked before loading
    loaded = load_model(cfg.model, "cpu", progress=_say)
    kv = import_peft(args.adapter, loaded.model.config)
    cfg = replace(cfg, prefix={"prefix_length": kv.shape[3]})
    import_run(cfg, folder.path, labels, loaded, kv, imported_from=str(args.adapter))
    print(f"imported a {kv.shape[3]}-token PEFT prefix into {folder.path}")
    return 0


def cmd_inspect(args) -> int:
    from prefixlab.engine.models import load_model
    from prefixlab.runs.folder import RunFolder
    from prefixlab.runs.inspection import inspect_run

    cfg = RunFolder(args.run).run_config()
    loaded = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code,
                        progress=_say)
    out = inspect_run(args.run, args.output, loaded, args.top_k, texts=args.text or None,
                      bank_size=args.bank_size, knockout_rows=args.knockout_rows,
                      knockout_precision=args.knockout_precision, progress=_say)
    written = ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".html")))
    print(f"wrote {written} to {out}")
    return 0


def cmd_worker(args) -> int:
    from prefixlab.runs.worker import run_worker

    return run_worker(args.run, resume=args.resume, lock_fd=args.lock_fd)


def build_parser() -> argparse.ArgumentParser:
    from prefixlab.engine.decode import DecodeConfig
    from prefixlab.engine.prefix import PrefixConfig
    from prefixlab.engine.train import TrainConfig
    from prefixlab.interpret.bank import DEFAULT_BANK_SIZE
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.inspection import DEFAULT_KNOCKOUT_ROWS

    parser = argparse.ArgumentParser(prog="python -m prefixlab",
                                     description="Prefix tuning of a frozen causal LM.")
    sub = parser.add_subparsers(dest="command", required=True)

    def columns(p):
        p.add_argument("--text-column", help="column holding the text (guessed when omitted)")
        p.add_argument("--label-column", help="column holding the label (guessed when omitted)")

    p = sub.add_parser("validate", help="check a labeled CSV and report every problem")
    p.add_argument("csv")
    columns(p)
    p.set_defaults(func=cmd_validate)

    def decoding(p, max_new_help: str) -> None:
        """Decoding options of evaluate and predict (the run's own settings otherwise)."""
        p.add_argument("--num-beams", type=int,
                       help="generation runs: 1 decodes greedily, 5 as the paper")
        p.add_argument("--max-new-tokens", type=int, help=max_new_help)
        p.add_argument("--stop", action="append", default=[],
                       help="generation runs: a string that ends an output (repeatable; "
                            "'\\n' for a newline)")

    p = sub.add_parser("train", help="train a prefix on a labeled CSV into a run folder")
    p.add_argument("csv")
    p.add_argument("--output", required=True, help="run folder to create")
    p.add_argument("--preset", choices=tuple(CLI_NAMES),
                   help="the app's recipe of that name (rows used, budget, patience, ...); "
                        "other options given beside it win over it. Without it: Balanced's "
                        "recipe on every row, with no time budget")
    # every setting, with its default and help, comes from the dataclasses (cli_options.py)
    p.set_defaults(func=cmd_train, setting_names={
        "run": add_options(p, RunConfig, skip=("train_csv", "prefix", "training",
                                               "generation")),
        "prefix": add_options(p, PrefixConfig),
        "training": add_options(p, TrainConfig),
        # batch_size is TrainConfig's option; stop (a list) is read by --stop below
        "generation": add_options(p, DecodeConfig, skip=("batch_size", "stop")),
    })
    p.add_argument("--stop", action="append", default=[],
                   help="generation runs: a string that ends an output (repeatable; "
                        "'\\n' for a newline)")

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run")
    p.add_argument("--nproc", type=int,
                   help="processes for this continuation (the result does not depend on it); "
                        "default: the run's setting")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("rank", help="one process of a data-parallel run (started by torchrun)")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("import-peft", help="make a run folder from a PEFT prefix adapter")
    p.add_argument("adapter", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--output", required=True, help="run folder to create")
    p.add_argument("--labels", required=True, help="comma-separated label names to score")
    p.set_defaults(func=cmd_import_peft,
                   setting_names=add_options(p, RunConfig, only=("model", "template")))

    p = sub.add_parser("inspect", help="nearest tokens, PCA maps and an HTML page of a prefix")
    p.add_argument("run")
    p.add_argument("--output", required=True, help="folder for the JSON files and HTML page")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--bank-size", type=int, default=DEFAULT_BANK_SIZE,
                   help="reference tokens per layer (frequent tokens + label words)")
    p.add_argument("--text", action="append", default=[],
                   help="an input for the attention view (repeatable)")
    p.add_argument("--knockout-rows", type=int, default=DEFAULT_KNOCKOUT_ROWS,
                   help="held-out rows scored with each slot and layer hidden (knockout.json); "
                        "0 skips the knockout")
    p.add_argument("--knockout-precision", choices=["auto", "float32", "bfloat16"],
                   default="auto", help="auto: bfloat16 where the processor multiplies it "
                   "natively (a GPU; a CPU with AVX512-BF16 or AMX), else float32")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("worker", help="train a registered run (started by the app)")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the run lock, from the app
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("evaluate", help="metrics of a run's prefix and baselines on a CSV")
    p.add_argument("run")
    p.add_argument("csv")
    columns(p)
    p.add_argument("--target-column", help="generation runs: the references' column")
    p.add_argument("--max-inputs", type=int, help="generation runs: score the first N inputs")
    decoding(p, "generation runs: most tokens generated (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label probabilities (or generation) with runs' prefixes")
    p.add_argument("run", nargs="?", help="a run folder (or give --run, repeatable)")
    p.add_argument("--run", dest="runs", action="append", default=[],
                   help="a run folder; several runs write one column group each")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--csv", help="batch prediction: input CSV")
    p.add_argument("--output", help="batch prediction: output CSV")
    p.add_argument("--text-column")
    p.add_argument("--generate", action="store_true",
                   help="classification runs: free generation after the prefix")
    decoding(p, "most tokens generated (default: the run's; 40 for free generation)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve the API alone: score/generate with any run's prefix")
    p.add_argument("--data-dir", required=True, help="the app's data directory (runs)")
    p.add_argument("--model", default=None,
                   help="the default base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--auth", default=os.environ.get("PREFIXLAB_AUTH"),
                   help="user:password, required when listening beyond this machine")
    p.add_argument("--window-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--max-rows", type=int, default=32, help="texts per mixed batch at most")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run's prefix")
    p.add_argument("run")
    p.add_argument("--format", choices=["peft", "safetensors"], default="peft")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        _say(f"error: {message}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
