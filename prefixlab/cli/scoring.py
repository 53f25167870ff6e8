"""Commands that use a trained run: evaluate on a CSV, predict (one run or several in
shared mixed batches), and serve the public API alone."""

from __future__ import annotations

import json

import numpy as np

from prefixlab.cli.options import stop_strings
from prefixlab.cli.output import print_report, results_header, say
from prefixlab.data.reading import DataError, read_table
from prefixlab.data.writing import write_csv


def cmd_evaluate(args) -> int:
    from prefixlab.runs.finished import evaluate_csv, open_run

    run = open_run(args.run, precision=args.precision)
    if run.is_generation:
        report = _evaluate_generation(run, args)
    else:
        report = evaluate_csv(run, args.csv, args.text_column, args.label_column,
                              adapt_prior=args.adapt_prior)
    if args.json:
        print(json.dumps(report))
    else:
        print(results_header(report))
        print_report(report)
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
              "stop": stop_strings(args)}
    return {k: v for k, v in given_.items() if v is not None}


def cmd_predict(args) -> int:
    from prefixlab.engine.predict import generate
    from prefixlab.runs.finished import open_run, predict_table

    if not args.text and not args.csv:
        raise DataError("give --text TEXT (repeatable) or --csv IN --output OUT")
    runs = ([args.run] if args.run else []) + args.runs
    if not runs:
        raise DataError("name a run folder: predict RUN or --run RUN (repeatable)")
    if len(runs) > 1:
        if args.explain:
            raise DataError("--explain explains one run's decisions: name one run")
        return _predict_many(args, runs)
    run = open_run(runs[0], precision=args.precision)
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
    if args.explain:
        if run.is_generation or not args.text:
            raise DataError("--explain explains classification decisions: give a "
                            "classification run and --text TEXT")
        _explain(run, args.text)
    elif args.text and not run.is_generation:
        probs = run.score(args.text, adapt_prior=args.adapt_prior)
        for text, row in zip(args.text, probs, strict=True):
            ranked = dict(sorted(zip(run.labels, map(float, row), strict=True),
                                 key=lambda kv: -kv[1]))
            print(json.dumps({"text": text, "label": next(iter(ranked)),
                              "probabilities": ranked}))
    if args.csv:
        if not args.output:
            raise DataError("--csv needs --output OUT.csv")
        frame = predict_table(run, args.csv, args.text_column, adapt_prior=args.adapt_prior)
        write_csv(frame, args.output)
        what = "generations" if run.is_generation else "predictions"
        say(f"wrote {len(frame)} {what} to {args.output}")
    return 0


def _explain(run, texts: list[str]) -> None:
    """Each text's probabilities under the prefix, its start and the bare model, and each
    word's effect on the decision with and without the prefix (leave one word out)."""
    from prefixlab.runs.explanation import SOURCE_NAMES, explain_text
    from prefixlab.runs.inspection import run_start

    start = run_start(run)
    if start.kv is None:
        say(f"no start row: {start.source}")
    for text in texts:
        ex = explain_text(run, start.kv, text)
        print(f"text: {text}")
        for name, probs in ex.probs.items():
            cells = "  ".join(f"p({label})={p:.3f}" for label, p in zip(ex.labels, probs,
                                                                        strict=True))
            print(f"  {SOURCE_NAMES[name]:<28} decides {ex.labels[ex.decision(name)]:<12} "
                  f"{cells}")
        print("  words, leave one word out (how much the decided label's probability drops "
              "without the word; negative: the word argues against it):")
        for name in ex.left_out:
            words = " ".join(f"{w}({e:+.2f})" for w, e in zip(ex.words, ex.effect(name),
                                                                strict=True))
            print(f"    {SOURCE_NAMES[name]} → {ex.labels[ex.decision(name)]}: "
                  f"{words or '(no words)'}")


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
                        precision=args.precision or cfg.precision, progress=say)
    store = PrefixStore(loaded)
    prefixes = [store.get(str(r)) for r in runs]  # refuses a run of another base model
    if args.generate:
        pairs = [(p, t) for p in prefixes for t in args.text]
        outs = mixed_generate(loaded.model, loaded.tokenizer, [p.kv for p, _ in pairs],
                              [t for _, t in pairs], args.max_new_tokens or 40)
        for (p, text), out in zip(pairs, outs, strict=True):
            print(json.dumps({"run": p.key, "text": text, "generated": out}))
        return 0
    if args.ensemble and {tuple(p.labels) for p in prefixes} != {tuple(prefixes[0].labels)}:
        raise DataError("--ensemble averages runs with the same labels in the same order; "
                        + "; ".join(f"{p.key}: {', '.join(p.labels)}" for p in prefixes))
    if args.text:
        pairs = [(p, t) for p in prefixes for t in args.text]
        probs = mixed_score_labels(loaded.model, [p.score_item(t) for p, t in pairs])
        if args.ensemble:  # one line per text: the runs' probabilities averaged
            mean = np.stack(probs).reshape(len(prefixes), len(args.text), -1).mean(0)
            for text, row in zip(args.text, mean, strict=True):
                ranked = dict(sorted(zip(prefixes[0].labels, map(float, row), strict=True),
                                     key=lambda kv: -kv[1]))
                print(json.dumps({"runs": [p.key for p in prefixes], "text": text,
                                  "label": next(iter(ranked)), "probabilities": ranked}))
            pairs, probs = [], []
        for (p, text), row in zip(pairs, probs, strict=True):
            ranked = dict(sorted(zip(p.labels, map(float, row), strict=True),
                                 key=lambda kv: -kv[1]))
            print(json.dumps({"run": p.key, "text": text, "label": next(iter(ranked)),
                              "probabilities": ranked}))
    if args.csv:
        if not args.output:
            raise DataError("--csv needs --output OUT.csv")
        frame = read_table(args.csv).frame
        column = text_column_of(frame, args.text_column or prefixes[0].text_column, args.csv,
                                guess=not args.text_column)
        out = predict_frame(loaded, prefixes, frame, column)
        write_csv(out, args.output)
        say(f"wrote {len(out)} predictions under {len(prefixes)} prefixes to {args.output}")
    return 0


def cmd_serve(args) -> int:
    """Serve the public API alone (no UI) over a data directory's runs."""
    from prefixlab.ui.api import serve_api

    serve_api(args.data_dir, args.model, args.host, args.port, args.auth,
              window_ms=args.window_ms, max_rows=args.max_rows, precision=args.precision,
              device=args.device)
    return 0
