"""The thread tuner picks the faster thread count and leaves a pinned one alone (by
OMP_NUM_THREADS, or by pin_threads in a process serving requests on many threads)."""

from __future__ import annotations

import pytest
import torch

from prefixlab.engine import cpu
from prefixlab.engine.cpu import ThreadTuner


def test_thread_tuner_follows_the_faster_thread_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    initial = torch.get_num_threads()
    if initial < 2:
        pytest.skip("torch runs one thread here: nothing to choose")
    wall, cpu, idle, total = [0.0], [0.0], [0], [0]
    tuner = ThreadTuner(torch.device("cpu"), clock=lambda: wall[0], cpu_clock=lambda: cpu[0],
                        machine_cpu=lambda: (idle[0], total[0]))

    def steps(seconds_per_token: dict[int, float], cpu_share: float, idle_share: float,
              n: int) -> list[int]:
        used = []
        for _ in range(n):
            tuner.start()
            threads = torch.get_num_threads()
            used.append(threads)
            seconds = seconds_per_token[threads] * 100
            wall[0] += seconds
            cpu[0] += seconds * threads * cpu_share
            total[0] += 1000
            idle[0] += int(1000 * idle_share)
            tuner.stop(100)
        return used

    try:
        quiet = steps({initial: 0.5, 1: 1.0}, 0.97, 0.0, 30)  # cores ours: never try one
        assert quiet == [initial] * 30
        busy = steps({initial: 6.0, 1: 1.0}, 0.2, 0.0, 30)  # shared cores, starved threads
        assert busy[-25:] == [1] * 25
        freed = steps({initial: 0.5, 1: 1.0}, 1.0, 0.5, 10)  # a core idle again
        assert freed[-8:] == [initial] * 8
        # a machine busy but not with our threads' share: tries lose and grow rarer
        mixed = steps({initial: 0.5, 1: 1.0}, 0.5, 0.0, 64)
        assert mixed.count(1) <= 7
    finally:
        tuner.close()
    assert torch.get_num_threads() == initial


def test_thread_tuner_leaves_a_pinned_count_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tuner = ThreadTuner(torch.device("cpu"))
    before = torch.get_num_threads()
    tuner.start()
    tuner.stop(100)
    tuner.close()
    assert not tuner.active and torch.get_num_threads() == before


def test_a_process_that_pins_its_threads_keeps_every_tuner_inactive(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "_pinned", None)
    before = torch.get_num_threads()
    if before < 2:
        pytest.skip("torch runs one thread here: a tuner is inactive anyway")
    assert ThreadTuner(torch.device("cpu")).active  # not pinned: the worker's case
    try:
        assert cpu.pin_threads(before) == before
        tuner = ThreadTuner(torch.device("cpu"), clock=lambda: 0.0, cpu_clock=lambda: 0.0)
        tuner.want_try, tuner.since_try = True, 99  # would try one thread if it were active
        tuner.start()
        assert not tuner.active and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not cpu.ONEDNN, reason="this torch has no oneDNN linear")
def test_onednn_inference_keeps_logits_and_autograd_and_can_be_undone():
    from tests.conftest import tiny_model

    model = tiny_model("llama").eval()
    ids = torch.tensor([[5, 9, 2, 7, 1], [3, 3, 8, 4, 6]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    want_autograd = model(input_ids=ids).logits.detach()
    keys = list(model.state_dict())
    assert cpu.onednn_inference(model) == 2 * 7 + 1  # q k v o gate up down per layer, head
    assert type(model.model.layers[0].self_attn.q_proj) is cpu.InferenceLinear
    assert list(model.state_dict()) == keys
    calls = []
    real = cpu.linear
    try:
        cpu.linear = lambda *a: calls.append(1) or real(*a)
        with torch.inference_mode():
            got = model(input_ids=ids).logits
        assert calls  # oneDNN ran
        calls.clear()
        grads = model(input_ids=ids).logits  # autograd on: nn.Linear's own product
        assert not calls
        with torch.inference_mode():
            model(input_ids=ids[:1, :3])  # 3 rows: too few for oneDNN to pay
        assert not calls
    finally:
        cpu.linear = real
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(grads.detach(), want_autograd)  # the very same products as before
    assert cpu.onednn_inference(model, on=False) == 15
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
