"""The time budget covers the whole run, final report included, and the final report says
how far it is: a generation run decodes what fits in the budget, and both kinds of run log
their final phase's progress (rows done of total, time spent, time left)."""

from __future__ import annotations

import time

import pytest
import torch

from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.models import prepare_model
from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.train import TrainConfig
from prefixlab.runs import generation
from prefixlab.runs.budget import MOST_SHARE, FinalReserve
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import create_run, execute_run, prepare_data
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return prepare_model(tiny_model("gpt2"), tokenizer, "tiny-gpt2", torch.device("cpu"))


def _progress(folder) -> list[dict]:
    return [r for r in folder.read_metrics()[0] if r["type"] == "progress"]


def test_the_reserve_is_a_share_until_an_evaluation_is_timed_then_its_estimate():
    cfg = RunConfig(train_csv="t.csv", text_column="input", target_column="target",
                    eval_generate_inputs=4, training=TrainConfig(max_minutes=10),
                    generation=DecodeConfig(num_beams=2))

    class Pairs:  # 20 distinct inputs, 60 rows
        def __len__(self):
            return 60

        def distinct_inputs(self):
            return 20

    reserve = FinalReserve.of(cfg, Pairs())
    assert reserve() == pytest.approx(0.3 * 600)  # a generation run's first guess
    # the report's loss reads every row twice (3 per input), it decodes 20 inputs twice
    # with 2 beams where an evaluation decodes 4 greedily: 6 x 1 s + 20 x 2 s
    reserve.timed({"scoring": 1.0, "decoding": 2.0})
    assert reserve() == pytest.approx(2.0 + 1.25 * (6 * 1.0 + 20 * 2.0))
    reserve.timed({"scoring": 100.0, "decoding": 100.0})
    assert reserve() == MOST_SHARE * 600  # the report gets at most half: it decodes less
    assert FinalReserve.of(RunConfig(train_csv="t.csv"), Pairs())() == 0.0  # no budget
    assert FinalReserve.of(RunConfig(train_csv="t.csv"), Pairs()).deadline(5.0) is None


def test_a_generation_run_decodes_what_fits_in_its_time_budget(tmp_path, gpt2, monkeypatch):
    """A generation Quick look took 6 min for a 1.5-min budget: its final report decoded
    every held-out input, with and without the prefix, after the budget had run out."""
    rows = ["input,target"] + [f"name[Place {i}] area[riverside],Place {i} is by the river."
                               for i in range(100)]
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    budget_s = 6.0
    cfg = RunConfig(
        train_csv=str(csv), text_column="input", target_column="target", model=gpt2.name,
        max_length=64, device="cpu", validation_share=0.4, eval_generate_inputs=2,
        prefix=PrefixConfig(prefix_length=4),
        generation=DecodeConfig(max_new_tokens=8, batch_size=4),
        training=TrainConfig(batch_size=8, epochs=1000, max_minutes=budget_s / 60,
                             eval_every=5, checkpoint_every=0, patience=0),
    )
    real = generation.generate_texts

    def slow(model, tokenizer, kv, prompts, config):  # 0.1 s an input: 8 s for all 40 twice
        time.sleep(0.1 * len(prompts))
        return real(model, tokenizer, kv, prompts, config)

    monkeypatch.setattr(generation, "generate_texts", slow)
    prepared = prepare_data(cfg)
    assert prepared.validation.distinct_inputs() == 40
    folder = create_run(cfg, tmp_path / "run", prepared, gpt2)
    began = time.monotonic()
    report = execute_run(folder, gpt2, prepared=prepared)
    took = time.monotonic() - began
    # (before: 14 s; the slack is for the setup before training and the last batch decoded)
    assert took < budget_s + 4, f"the run took {took:.1f} s of a {budget_s:.0f}-s budget"
    assert "time budget" in report["stop_reason"]
    decoded = report["decoded"]
    assert decoded["of"] == 40 and 4 <= decoded["inputs"] < 40
    assert report["n"] == decoded["inputs"] == report["baselines"]["bare_model"]["n"]
    assert len(report["samples"]) == min(decoded["inputs"], generation.SAMPLE_ROWS)

    # The final phase told its progress: both losses over every row, then the decoding.
    progress = _progress(folder)
    whats = list(dict.fromkeys(r["what"] for r in progress))
    assert whats == ["loss with the prefix", "loss of the bare model",
                     "decoding held-out inputs (prefix and bare model)"]
    decoding = [r for r in progress if r["what"].startswith("decoding")]
    assert [r["done"] for r in decoding] == list(range(0, 2 * decoded["inputs"] + 1, 4))
    assert all(r["total"] == 80 for r in decoding)
    assert decoding[0]["eta_s"] is None and decoding[-1]["eta_s"] > 0  # 0 done: no estimate
    assert decoding[-1]["elapsed_s"] > 0.1 * decoding[-1]["done"] * 0.9
    assert folder.status()["state"] == "completed"


def test_a_classification_run_tells_the_progress_of_its_final_evaluation(tmp_path, gpt2):
    rows = ["text,label"] + [f"the movie was {'great' if i % 2 else 'bad'} {i},"
                             f"{'positive' if i % 2 else 'negative'}" for i in range(400)]
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    cfg = RunConfig(train_csv=str(csv), text_column="text", label_column="label",
                    model=gpt2.name, max_length=48, device="cpu", validation_share=0.4,
                    prefix=PrefixConfig(prefix_length=4),
                    training=TrainConfig(batch_size=16, epochs=1, max_steps=2,
                                         checkpoint_every=0))
    prepared = prepare_data(cfg)
    folder = create_run(cfg, tmp_path / "run", prepared, gpt2)
    execute_run(folder, gpt2, prepared=prepared)
    progress = _progress(folder)
    assert {r["what"] for r in progress} == {
        "scoring held-out rows without the prefix (zero-shot)"}
    assert [r["done"] for r in progress] == [0, 64, 128, 160] and progress[-1]["total"] == 160
    records = folder.read_metrics()[0]
    last_step = max(i for i, r in enumerate(records) if r["type"] == "step")
    assert records.index(progress[0]) > last_step  # after training, before "completed"
    assert records[-1]["message"] == "completed"
