"""Comparing methods (runs/compare.py, engine/methods.py): each trains only its own weights,
all share one split, encoder and decision rule, their counts and sizes are right, and a
method that cannot run is refused before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefixlab.cli.main import main
from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.methods import build_trainable, method_problems, parse_methods
from prefixlab.engine.models import prepare_model
from prefixlab.engine.train import TrainConfig, train
from prefixlab.errors import ConfigError
from prefixlab.runs import compare as compare_module
from prefixlab.runs.compare import CompareConfig, run_comparison
from prefixlab.runs.config import RunConfig
from tests.conftest import LABELS, TEXTS, make_tokenizer, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT on GPT-2's Conv1D
              pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def llama():
    return prepare_model(tiny_model("llama"), make_tokenizer(), "tiny-llama", torch.device("cpu"))


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rows = ["text,label"] + [f"the movie was {'great' if i % 2 else 'bad'} {i},"
                             f"{'positive' if i % 2 else 'negative'}" for i in range(40)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(csv_file: Path, model: str = "tiny-llama") -> RunConfig:
    return RunConfig(train_csv=str(csv_file), text_column="text", label_column="label",
                     model=model, max_length=48, device="cpu", prefix={"prefix_length": 4},
                     training={"epochs": 1, "batch_size": 4, "learning_rate": 1e-2,
                               "patience": 0})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["prompt", "lora", "ia3", "full"])
def test_each_method_trains_only_its_own_weights(name, llama):
    base = _weights(llama.model)
    trainable = build_trainable(name, llama, prompt_ids=[5, 6, 7], prompt_length=4)
    before = trainable.state()
    inside = _weights(trainable.model)
    enc = Encoder(llama.tokenizer, Template(), ["negative", "positive"], max_length=64)
    result = train(trainable.model, trainable, enc.examples(TEXTS, LABELS),
                   TrainConfig(epochs=2, batch_size=3, learning_rate=1e-2, warmup_share=0),
                   llama.tokenizer.pad_token_id, fast_path=name == "prompt")
    assert result.steps == 4
    after = trainable.state()
    assert before.keys() == after.keys() and before
    assert all(not torch.equal(before[k], after[k]) for k in before), "every trained weight moves"
    for k, v in _weights(llama.model).items():  # the shared base model is untouched
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    if name in ("lora", "ia3"):  # inside the copy, only the adapter's weights moved
        for k, v in _weights(trainable.model).items():
            if k in inside and not any(t in k for t in ("lora_", "ia3_")):
                torch.testing.assert_close(v, inside[k], rtol=0, atol=0, msg=k)


def test_trainable_counts(llama):
    L, E, P = 2, 32, 4
    prompt = build_trainable("prompt", llama, prompt_length=P)
    assert prompt.trainable_parameters() == P * E
    # LoRA r=8 on q_proj (32 -> 32) and v_proj (32 -> 2 kv heads x 8 = 16), every layer
    lora = build_trainable("lora", llama)
    assert lora.trainable_parameters() == L * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))
    full = build_trainable("full", llama)
    assert full.trainable_parameters() == llama.num_parameters
    assert full.stored_bytes() == 4 * llama.num_parameters


def test_comparison_shares_one_split_encoder_and_rule(tmp_path, csv_file, llama, monkeypatch):
    prepared_calls, encoders = [], []
    real_prepare, real_encoder = compare_module.prepare_data, RunConfig.label_encoder

    def prepare(cfg):
        prepared_calls.append(cfg)
        return real_prepare(cfg)

    def encoder(self, *args, **kwargs):
        enc = real_encoder(self, *args, **kwargs)
        encoders.append(enc)
        return enc

    monkeypatch.setattr(compare_module, "prepare_data", prepare)
    monkeypatch.setattr(RunConfig, "label_encoder", encoder)
    out = tmp_path / "cmp"
    result = run_comparison(_config(csv_file), CompareConfig(
        methods=["prefix", "prompt", "lora", "probe", "tfidf"], shift_csv=str(csv_file)),
        out, llama)
    assert len(prepared_calls) == 1
    assert {(tuple(e.head_ids), tuple(e.tail_ids), tuple(map(tuple, e.label_ids)),
             e.max_length) for e in encoders} == {(tuple(encoders[0].head_ids),
                                                  tuple(encoders[0].tail_ids),
                                                  tuple(map(tuple, encoders[0].label_ids)),
                                                  48)}
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["prefix", "prompt", "lora", "probe", "tfidf"]
    assert {r["validation"]["rows"] for r in rows.values()} == {8}
    assert {r["shift"]["rows"] for r in rows.values()} == {40}
    # the gradient methods kept a step chosen by the same rule, within the same budget
    assert rows["prefix"]["steps"] == rows["prompt"]["steps"] == rows["lora"]["steps"]
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["verdict"] and saved["rows"][0]["folder"] == str(out / "prefix")
    assert (out / "prefix" / "prefix.safetensors").is_file()
    for name in ("prompt", "lora"):  # stored bytes: the adapter file, 4 bytes a weight
        stored, count = rows[name]["stored_bytes"], rows[name]["trainable_parameters"]
        assert 4 * count <= stored <= 4 * count + 4096
        assert (out / name / "adapter_config.json").is_file()
    assert rows["prefix"]["trainable_parameters"] == 2 * 2 * 2 * 4 * 8  # L, K/V, H_kv, P, D


def test_a_method_that_cannot_run_is_refused_before_anything_trains(tmp_path, csv_file,
                                                                    llama, monkeypatch):
    assert method_problems(["lora", "full"], "llama", torch.float32, False) == []
    assert len(method_problems(["lora"], "no-such-family", torch.float32, False)) == 1
    trained = []
    monkeypatch.setattr(compare_module, "_train", lambda *a, **k: trained.append(a))
    bf16 = prepare_model(tiny_model("llama"), make_tokenizer(), "tiny", torch.device("cpu"),
                         torch.bfloat16)
    out = tmp_path / "refused"
    with pytest.raises(ConfigError) as e:
        run_comparison(_config(csv_file), CompareConfig(methods=["prefix", "full"]), out, bf16)
    assert len(e.value.problems) == 1 and "float32" in str(e.value)
    assert not trained and not out.exists()
    with pytest.raises(ConfigError, match="unknown methods lorra, nope"):
        parse_methods("prefix,lorra,nope")


def test_cli_refuses_a_bad_method_name_in_one_line(tmp_path, csv_file, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(csv_file), "--methods", "prefix,lorra",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown method lorra; the methods are prefix, prompt, lora, ia3, "
                   "full, probe, tfidf"]
    assert not out.exists()
