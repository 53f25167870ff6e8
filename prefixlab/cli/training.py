"""Commands that check data and train: validate, train, resume, and the processes the app
and torch's launcher start (worker, rank).

A run trains here in one process, or on N data-parallel ranks started by torch's launcher
(`--nproc N`); this process then holds the run lock for them and reports their failure.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefixlab.cli.options import given, stop_strings
from prefixlab.cli.output import (
    final_progress,
    print_report,
    progress_bar,
    results_header,
    say,
)
from prefixlab.data.labeled import load_labeled_csv


def cmd_validate(args) -> int:
    data = load_labeled_csv(args.csv, args.text_column, args.label_column)
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
    if stop_strings(args):
        generation["stop"] = stop_strings(args)
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
                    cfg.model, trust_remote_code=cfg.trust_remote_code, progress=say),
                    f"{ranks.world_size} processes")
            distributed.barrier()  # the run folder exists before any rank reads it
            return _execute_rank(RunFolder(args.output), device, resume=False, claim=True)
        finally:
            distributed.stop()
    device = pick_device(cfg.device)
    processes = distributed.process_count(cfg.nproc, device)
    if processes > 1:
        folder, _, _ = _create(cfg, Path(args.output), lambda: describe_model(
            cfg.model, trust_remote_code=cfg.trust_remote_code, progress=say),
            f"{processes} processes on {device.type}")
        return _launch(folder, processes, resume=False)
    folder, prepared, loaded = _create(cfg, Path(args.output), lambda: load_model(
        cfg.model, device, trust_remote_code=cfg.trust_remote_code, progress=say,
        precision=cfg.precision), str(device))
    return _execute(folder, loaded, prepared, resume=False)


def _create(cfg, output: Path, model, where: str):
    """Check the output folder and the data, then write the run folder; `model()` gives the
    base model (or its ModelInfo: no weights are needed to describe a run)."""
    from prefixlab.runs.experiment import create_run, prepare_data

    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output")
    prepared = prepare_data(cfg)  # refuses bad data before anything is written
    for w in prepared.warnings:
        say(f"warning: {w}")
    loaded = model()
    folder = create_run(cfg, output, prepared, loaded)
    info = folder.read_config()
    p = info["prefix"]
    rows = f"{len(prepared.train)} train / {len(prepared.validation)} validation rows"
    if cfg.is_generation:
        rows += (f" ({prepared.train.distinct_inputs()} / "
                 f"{prepared.validation.distinct_inputs()} distinct inputs)")
    say(f"training a {cfg.prefix.prefix_length}-token prefix on {loaded.name} ({where}): "
        f"{p['trainable_parameters']:,} trainable parameters = {p['share_of_model']:.4%} of "
        f"the model's {info['model']['parameters']:,}; {rows}")
    return folder, prepared, loaded


def _launch(folder, processes: int, resume: bool, longer: tuple[float, int] | None = None
            ) -> int:
    """Train the run in `folder` on `processes` ranks started by torch's launcher here. This
    process holds the run lock for them (rank 0 writes), and records a failure after they
    are all gone. `longer`: (more minutes, more epochs) for a completed run first."""
    from prefixlab.runs.folder import CANCEL_FILE
    from prefixlab.runs.locks import RunLock
    from prefixlab.runs.worker import launch_ranks

    with RunLock.claim(folder.path):
        if longer:
            _extend(folder, longer)
        (folder.path / CANCEL_FILE).unlink(missing_ok=True)  # an old request from the app
        if launch_ranks(folder, processes, resume) == 0:
            return 0
    say(f"error: {folder.status().get('error')}; the other workers were stopped")
    if folder.checkpoint_path.is_file():
        say(f"the last checkpoint is kept: continue with `python -m prefixlab resume "
            f"{folder.path}`")
    return 1


def _execute_rank(folder, device, resume: bool, claim: bool) -> int:
    """One rank's share of training the run in `folder` (the process group is started)."""
    from prefixlab.engine.models import load_model

    cfg = folder.run_config()
    loaded = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                        precision=cfg.precision)
    return _execute(folder, loaded, None, resume=resume, claim=claim)


def _extend(folder, longer: tuple[float, int]) -> None:
    """Give the completed run in `folder` more minutes and/or epochs (the lock is held)."""
    from prefixlab.runs.extension import describe_extension, extend_run

    say(f"training {folder.path.name} longer, "
        f"{describe_extension(extend_run(folder, *longer))}")


def _execute(folder, loaded, prepared, resume: bool, claim: bool = True,
             longer: tuple[float, int] | None = None) -> int:
    """Train here. `claim`: take the run lock; False in ranks whose launcher holds it (the
    app's worker or `train --nproc`), which also stop when the app asks to cancel.
    `longer`: (more minutes, more epochs) to give a completed run first, under the lock."""
    from prefixlab.engine import distributed
    from prefixlab.engine.balance import describe_decision
    from prefixlab.runs.experiment import execute_run
    from prefixlab.runs.extension import ended_on_budget
    from prefixlab.runs.folder import CANCEL_FILE
    from prefixlab.runs.locks import RunLock
    from prefixlab.runs.trials import choice_sentence

    writer = distributed.is_writer()
    # The run lock makes this process the run's only writer (an app's worker on the same
    # folder is refused, and the app does not take this run for a dead one). Under torchrun
    # rank 0 writes, and holds it unless its launcher (train --nproc, the worker) does.
    lock = RunLock.claim(folder.path) if claim and writer else contextlib.nullcontext()
    with lock:
        if longer:
            _extend(folder, longer)
        bar, on_step = progress_bar(0)
        try:
            report = execute_run(folder, loaded, prepared=prepared, on_step=on_step,
                                 resume=resume, should_stop=None if claim else
                                 (folder.path / CANCEL_FILE).exists,
                                 on_progress=final_progress())
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
        say(f"stopped; last checkpoint kept in {folder.path}")
        # a rank's launcher would take a non-zero exit for a failure; the status says cancelled
        return 1 if claim else 0
    print(f"run saved to {folder.path}")
    print(f"kept step {report['kept_step']} of {report['steps']} ({report['selection']}); "
          f"training ended: {report['stop_reason']}")
    if choice := choice_sentence(report):
        print(choice)
    if decision := describe_decision(report):
        print(decision)
    print(results_header(report))
    print_report(report)
    if ended_on_budget(report) and report["kept_step"] == report["steps"]:
        say(f"it was still improving when its budget ended: `python -m prefixlab resume "
            f"{folder.path} --more-minutes M` (or --more-epochs E) trains it longer")
    return 0


def cmd_resume(args) -> int:
    from prefixlab.engine import distributed
    from prefixlab.engine.models import load_model, pick_device
    from prefixlab.runs.extension import check_amounts, check_run
    from prefixlab.runs.folder import RunError, RunFolder

    folder = RunFolder(args.run)
    cfg = folder.run_config()
    longer = (args.more_minutes, args.more_epochs)
    longer = longer if any(longer) else None
    ranks = distributed.Ranks.from_env()
    if ranks is not None:  # `torchrun ... -m prefixlab resume RUN`
        if longer:
            raise RunError("--more-minutes and --more-epochs change the run before it "
                           "resumes: give them to `resume --nproc N`, not under torchrun")
        return _rank_main(folder, cfg, ranks, resume=True, claim=True)
    if longer:  # refused before the model loads (and checked again under the run lock)
        check_amounts(*longer)
        check_run(folder)
    device = pick_device(cfg.device)
    processes = distributed.process_count(args.nproc or cfg.nproc, device)
    if processes > 1:
        return _launch(folder, processes, resume=True, longer=longer)
    loaded = load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                        precision=cfg.precision, progress=say)
    return _execute(folder, loaded, None, resume=True, longer=longer)


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


def cmd_worker(args) -> int:
    from prefixlab.runs.worker import run_worker

    return run_worker(args.run, resume=args.resume, lock_fd=args.lock_fd)
