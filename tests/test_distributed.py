"""Data-parallel training (distributed.py): shares of a batch, gradients that add up, failure
messages; and, with real processes started by torch's launcher (slow), a 2-rank gloo run that
ends with the one-process prefix, a killed rank and the resume after it. The same check on
the device under test (NCCL where there are GPUs, gloo on the CPU) is in test_device.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from prefixlab.cli.main import main
from prefixlab.engine import distributed
from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.models import prepare_model
from prefixlab.engine.prefix import Prefix, PrefixConfig, init_prefix
from prefixlab.engine.train import TrainConfig, _backward
from prefixlab.runs.config import ConfigError, RunConfig
from prefixlab.runs.experiment import create_run, execute_run, prepare_data
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.registry import RunStore
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import process_range
from tests.test_train import toy_task

ROOT = Path(__file__).resolve().parents[1]


# --- in one process -------------------------------------------------------------------------


def test_shares_cover_the_batch_in_order_and_differ_by_at_most_one_row():
    for n in range(10):
        rows = list(range(n))
        for world in (1, 2, 3, 4):
            parts = [distributed.share(rows, r, world) for r in range(world)]
            assert sum(parts, []) == rows
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.share([7], 0, 2) == [] and distributed.share([7], 1, 2) == [7]


@pytest.mark.parametrize("reparameterize", [False, True])
def test_the_ranks_gradients_add_up_to_the_batch_gradient(loaded, reparameterize):
    """Uneven shares (2/2/1 of 5 rows) and an empty one (1 row over 2 ranks) included; the
    Llama kind goes through the lean CPU step, GPT-2 through autograd."""
    texts, labels = toy_task(6, seed=3)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=64)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4, reparameterize=reparameterize,
                                               reparam_hidden=16))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    params = [p for p in prefix.parameters() if p.requires_grad]
    device = torch.device("cpu")
    examples = enc.examples(texts, labels)
    for batch, world in ((examples[:5], 3), (examples[5:], 2)):
        prefix.zero_grad(set_to_none=True)
        whole, _, _ = _backward(loaded.model, prefix.key_values(), batch, 0, device, 384)
        expected = [p.grad.clone() for p in params]
        total = sum(len(e.target) for e in batch)
        summed, loss = [torch.zeros_like(p) for p in params], 0.0
        for r in range(world):
            prefix.zero_grad(set_to_none=True)
            part = distributed.share(batch, r, world)
            value, _, _ = _backward(loaded.model, prefix.key_values(), part, 0, device, 384,
                                    n_targets=total)
            loss += value
            for s, p in zip(summed, params, strict=True):
                if p.grad is not None:
                    s += p.grad
        assert loss == pytest.approx(whole, rel=1e-5)
        for s, e in zip(summed, expected, strict=True):
            torch.testing.assert_close(s, e, atol=1e-6, rtol=1e-4)


def test_outside_a_process_group_every_helper_is_the_identity():
    calls = []

    def compute(items):
        calls.append(list(items))
        return np.arange(len(items), dtype=np.float64)[:, None]

    assert distributed.gather_rows(compute, ["a", "b", "c"]).ravel().tolist() == [0, 1, 2]
    assert calls == [["a", "b", "c"]]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.reduce_step([p], 1.5, 7) == [1.5, 7]
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert distributed.agree(True) and not distributed.agree(False)
    assert distributed.agree_min(7) == 7
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_writer() and distributed.share([1, 2, 3]) == [1, 2, 3]


def _agree_min_rank(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        Path(out, f"{rank}.txt").write_text(str(distributed.agree_min(40 - 15 * rank)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_the_shorter_planned_schedule(tmp_path):
    # each rank's clock plans its own schedule length (schedule.planned_end); they run the shorter
    torch.multiprocessing.spawn(_agree_min_rank, nprocs=2, join=True,
                                args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)))
    assert [float((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [25.0, 25.0]


def test_process_counts_default_to_every_gpu_and_one_cpu_process(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert distributed.process_count(None, cpu) == 1
    assert distributed.process_count(3, cpu) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.process_count(None, cuda) == 4
    assert distributed.process_count(None, torch.device("cuda", 2)) == 1
    assert distributed.process_count(2, cuda) == 2
    with pytest.raises(distributed.LaunchError, match="need 5 GPUs .* this machine has 4"):
        distributed.process_count(5, cuda)
    with pytest.raises(distributed.LaunchError, match="names one GPU"):
        distributed.process_count(2, torch.device("cuda", 1))
    with pytest.raises(distributed.LaunchError, match="1..256"):
        distributed.process_count(0, cpu)
    with pytest.raises(ConfigError, match="nproc must be 1..256"):
        RunConfig(train_csv="x.csv", nproc=0)


def test_the_benchmark_rate_leaves_out_the_first_steps():
    from prefixlab.bench.ddp import Layout, steady_rate

    # 8 examples a step: 1 s for each of the first two steps, then 0.5 s
    elapsed = [1.0, 2.0, 2.5, 3.0, 3.5]
    records = [{"type": "event"}] + [
        {"type": "step", "step": i + 1, "elapsed_s": t, "examples_per_s": 8 * (i + 1) / t}
        for i, t in enumerate(elapsed)]
    assert steady_rate(records) == pytest.approx(16.0)
    assert steady_rate(records, warm=0) == pytest.approx(40 / 3.5)
    with pytest.raises(ValueError, match="only 5 steps"):
        steady_rate(records, warm=5)
    assert Layout(2, 1).name == "2 processes x 1 thread"


def test_the_app_offers_every_gpu_and_one_cpu_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_range()[0] == 1 and process_range()[1] >= 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert process_range() == (4, 4)


def test_a_dead_or_failed_rank_is_named_in_words(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure, get_error_handler

    killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="<N/A>")
    # rank 0 then fails too, for want of its peer: the signal is the cause to name
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file="<N/A>")
    e = distributed.failure_of({0: stopped, 1: killed}, 2)  # 0 was stopped by the launcher
    assert str(e) == "worker 1 of 2 died: killed by SIGKILL" and e.killed
    e = distributed.failure_of({0: stopped}, 2)
    assert str(e) == "worker 0 of 2 died: killed by SIGTERM"

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise ValueError("the run folder is gone")
    except ValueError as exc:
        get_error_handler().record_exception(exc)  # what the rank command does
    failed = ProcessFailure(local_rank=0, pid=12, exitcode=1, error_file=str(error_file))
    e = distributed.failure_of({3: failed}, 4)
    assert str(e) == "worker 3 of 4 failed: ValueError: the run folder is gone"
    assert not e.killed
    peer_file = tmp_path / "peer.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(peer_file))
    try:  # what a rank's all_reduce raises when another rank is gone
        raise torch.distributed.DistBackendError("[gloo] Connection closed by peer")
    except RuntimeError as exc:
        get_error_handler().record_exception(exc)
    peer = ProcessFailure(local_rank=0, pid=13, exitcode=1, error_file=str(peer_file))
    assert str(distributed.failure_of({0: peer, 3: failed, 1: stopped}, 4)).startswith(
        "worker 3 of 4 failed: ValueError")


def test_the_rank_command_outside_torchrun_says_what_to_use(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["rank", str(tmp_path)]) == 2
    assert "use `train --nproc N` or `resume`" in capsys.readouterr().err


# --- real processes started by torch's launcher ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return prepare_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         AutoTokenizer.from_pretrained(model_dir), str(model_dir),
                         torch.device("cpu"))


@pytest.fixture
def csv_file(tmp_path) -> Path:
    texts, labels = toy_task(33, seed=1)  # 26 train rows
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels,
                                                                             strict=True)))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _records(folder: RunFolder) -> list[dict]:
    return [json.loads(x) for x in folder.metrics_path.read_text().splitlines()]


def _reference(tiny, cfg: RunConfig, path: Path) -> RunFolder:
    """The same run in this process, one rank."""
    cfg = RunConfig.from_dict({**cfg.to_dict(), "nproc": 1})
    folder = create_run(cfg, path, prepare_data(cfg), tiny)
    execute_run(folder, tiny)
    return folder


def _assert_same_training(ours: RunFolder, reference: RunFolder) -> None:
    a, b = ours.load_checkpoint(), reference.load_checkpoint()
    assert a.step == b.step
    for key, value in b.prefix_state.items():
        torch.testing.assert_close(a.prefix_state[key], value, atol=2e-5, rtol=1e-4)
    for key, value in b.optimizer_state.items():
        torch.testing.assert_close(a.optimizer_state[key], value, atol=1e-6, rtol=1e-3)
    evals = [[r for r in _records(f) if r["type"] == "eval"] for f in (ours, reference)]
    assert [(r["step"], r["accuracy"]) for r in evals[0]] == \
        [(r["step"], r["accuracy"]) for r in evals[1]]
    assert [r["val_loss"] for r in evals[0]] == pytest.approx(
        [r["val_loss"] for r in evals[1]], rel=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_train_the_prefix_one_process_trains(tmp_path, csv_file, model_dir,
                                                                 tiny):
    """batch 5 over 2 ranks: 2 + 3 rows, and an epoch's last batch of 1 row leaves rank 0 an
    empty share. Rank 0 alone writes: every step and evaluation is in the log once."""
    out = tmp_path / "two"
    args = [str(csv_file), "--output", str(out), "--model", str(model_dir), "--device", "cpu",
            "--prefix-length", "4", "--batch-size", "5", "--epochs", "2", "--max-length", "48",
            "--learning-rate", "0.01", "--seed", "3"]
    proc = subprocess.run([sys.executable, "-m", "prefixlab", "train", *args, "--nproc", "2"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes on cpu" in proc.stderr and proc.stdout.count("held-out results") == 1
    ours = RunFolder(out)
    reference = _reference(tiny, ours.run_config(), tmp_path / "one")
    _assert_same_training(ours, reference)
    records = _records(ours)
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 13))  # 26 train rows: 5 batches of 5 and 1 of 1, 2 epochs
    assert [r["message"] for r in records if r["type"] == "event"] == [
        "started", "evaluating", "decision", "completed"]
    assert records[0]["processes"] == 2
    status = ours.status()
    assert status["state"] == "completed" and status["processes"] == 2
    assert [s for s, _ in ours.snapshots()] == [s for s, _ in reference.snapshots()]
    assert ours.read_report()["accuracy"] == reference.read_report()["accuracy"]


@pytest.mark.slow
def test_two_gloo_processes_choose_the_learning_rate_as_one_process_does(tmp_path, csv_file,
                                                                         model_dir, tiny):
    """Each trial trains on both ranks, rank 0 alone writes it, and the run is the winner's."""
    out = tmp_path / "two"
    args = [str(csv_file), "--output", str(out), "--model", str(model_dir), "--device", "cpu",
            "--prefix-length", "4", "--batch-size", "5", "--epochs", "2", "--max-length", "48",
            "--learning-rate", "0.01", "--try-learning-rates", "0.05", "--seed", "3"]
    proc = subprocess.run([sys.executable, "-m", "prefixlab", "train", *args, "--nproc", "2"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = RunFolder(out)
    info = ours.read_config()
    assert info["learning_rate_choice"]["tried"] == [0.01, 0.05]
    chosen = info["run"]["training"]["learning_rate"]
    assert "chosen on the validation rows" in proc.stdout
    for rate in (0.01, 0.05):
        trial = RunFolder(out / "trials" / f"lr-{rate:g}")
        steps = [r["step"] for r in _records(trial) if r["type"] == "step"]
        assert steps == list(range(1, 13))  # written once, by rank 0
        reference = _reference(tiny, trial.run_config(), tmp_path / f"one-{rate:g}")
        _assert_same_training(trial, reference)
    won = RunFolder(out / "trials" / f"lr-{chosen:g}")
    assert ours.prefix_path.read_bytes() == won.prefix_path.read_bytes()
    assert ours.status()["state"] == "completed"


def _rank_process(worker_pid: int, rank: int, timeout: float = 120.0) -> psutil.Process:
    end = time.time() + timeout
    while time.time() < end:
        for child in psutil.Process(worker_pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "rank" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under worker {worker_pid}")


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_and_resume_continues_it(tmp_path, csv_file, model_dir,
                                                             tiny):
    """The app's path: a worker process starts 2 ranks; rank 1 is killed with SIGKILL after a
    checkpoint; the run ends within seconds, says which worker died, keeps the checkpoint;
    it resumes, is cancelled from the app, resumes again and ends with the prefix of an
    uninterrupted one-process run."""
    cfg = RunConfig(train_csv=str(csv_file), text_column="text", label_column="label",
                    model=str(model_dir), max_length=48, device="cpu", nproc=2,
                    prefix=PrefixConfig(prefix_length=4),
                    training=TrainConfig(epochs=8, batch_size=2, checkpoint_every=4,
                                         learning_rate=1e-2, seed=5))
    store = RunStore(tmp_path / "data")
    run_id = store.create(cfg, tiny, name="killed")
    folder = store.folder(run_id)
    store.start(run_id)
    worker = store.get(run_id).pid
    ranks = [_rank_process(worker, r) for r in (0, 1)]
    end = time.time() + 120
    while time.time() < end and not folder.checkpoint_path.is_file():
        time.sleep(0.02)
    for p in ranks:  # hold both still, so the kill lands mid-run, whatever the machine's load
        p.suspend()
    ranks[1].kill()
    ranks[0].resume()
    killed_at = time.time()
    assert store.workers[worker].wait(timeout=60) == 1
    ended_in = time.time() - killed_at
    assert ended_in < 15, f"the run took {ended_in:.1f} s to end after the kill"
    store.refresh()
    row = store.get(run_id)
    assert row.state == "interrupted"
    assert row.error == "worker 1 of 2 died: killed by SIGKILL"
    checkpoint = folder.load_checkpoint()  # intact
    assert checkpoint.step % 4 == 0 and 0 < checkpoint.step < row.total_steps
    assert not psutil.pid_exists(ranks[0].pid) or ranks[0].status() == psutil.STATUS_ZOMBIE

    # resumed, then cancelled from the app: both ranks stop at the same step
    store.start(run_id, resume=True)
    worker = store.get(run_id).pid
    ranks = [_rank_process(worker, r) for r in (0, 1)]
    end = time.time() + 120
    while time.time() < end and folder.load_checkpoint().step <= checkpoint.step:
        time.sleep(0.05)
    for p in ranks:
        p.suspend()
    store.cancel(run_id)
    for p in ranks:
        p.resume()
    assert store.workers[worker].wait(timeout=120) == 0
    store.refresh()
    row = store.get(run_id)
    assert row.state == "cancelled", row.error
    assert checkpoint.step < folder.load_checkpoint().step < row.total_steps

    store.start(run_id, resume=True)
    assert store.workers[store.get(run_id).pid].wait(timeout=300) == 0
    store.refresh()
    assert store.get(run_id).state == "completed", store.get(run_id).error
    resumed = [r for r in _records(folder) if r.get("message") == "resumed"]
    assert len(resumed) == 2 and resumed[0]["step"] == checkpoint.step
    assert resumed[0]["processes"] == 2
    _assert_same_training(folder, _reference(tiny, cfg, tmp_path / "one"))
    assert Workbench(tmp_path / "data").runs_table().iloc[0]["processes"] == 2
