"""Slow tests on the real embedded default model (SmolLM2-135M-Instruct) and real data."""

from __future__ import annotations

import os

import pytest
import torch

from prefixlab.engine.models import DEFAULT_MODEL, embedded_model_dir, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL, "cpu")


def test_default_model_loads_offline_from_the_converted_cache(default_model):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    shape = default_model.shape
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (30, 3, 64)
    assert (embedded_model_dir() / "model.safetensors").is_file()
    assert all(not p.requires_grad for p in default_model.model.parameters())


def test_text_prefix_equals_reading_the_text_on_the_real_model(default_model):
    from prefixlab.engine.prefix import forward, text_key_values

    model, tok = default_model.model, default_model.tokenizer
    text = tok("Classify the tweet:", add_special_tokens=False)["input_ids"]
    kv = text_key_values(model, tok, "Classify the tweet:", len(text))
    x = tok(" you are all wonderful", add_special_tokens=False)["input_ids"]
    got = forward(model, kv, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))
    want = model(input_ids=torch.tensor([text + x])).logits[:, len(text):]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prefix_beats_zero_shot_on_real_labeled_data(default_model, shared_data, tmp_path):
    from prefixlab.engine.train import TrainConfig
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data

    cfg = RunConfig(
        train_csv=str(shared_data / "davidson_hate_offensive.csv"), text_column="text",
        label_column="label", max_train_examples=160, max_eval_examples=120, max_length=96,
        training=TrainConfig(batch_size=8, epochs=1, seed=0),
    )
    prepared = prepare_data(cfg)
    folder = create_run(cfg, tmp_path / "run", prepared, default_model)
    report = execute_run(folder, default_model, prepared=prepared)
    zero = report["baselines"]["zero_shot"]
    assert report["n"] == 120
    assert report["macro_f1"] > zero["macro_f1"] + 0.05, (report["macro_f1"], zero["macro_f1"])
    # the step kept is the best of the evaluations (two per epoch), and the report says why
    # training ended; the majority class stands beside the other baselines
    assert report["kept_step"] in (10, 20) and report["stop_reason"] == "budget of 1 epoch"
    assert report["baselines"]["majority"]["predicted"]["offensive"] == 120
