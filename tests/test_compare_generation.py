"""Comparing methods on a generation run (runs/compare.py with a target column): every
gradient method trains on the same pairs and decodes with the same settings, rows carry
BLEU/chrF/ROUGE-L beside the bare model, and the methods that classify are refused in one
line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from prefixlab.cli.main import main
from prefixlab.engine.decode import greedy
from prefixlab.engine.methods import build_trainable
from prefixlab.engine.models import prepare_model
from prefixlab.engine.prefix import forward
from prefixlab.errors import ConfigError
from prefixlab.runs import compare as compare_module
from prefixlab.runs import contenders, generation
from prefixlab.runs.compare import GENERATION_SCORES, CompareConfig, run_comparison
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.verdict import format_table, table_columns, table_rows, verdict
from tests.conftest import make_tokenizer, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT on a tiny model
              pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")]

NAMES = ["Aromi", "Cotto", "Zizzi", "Strada", "Alimentum"]


@pytest.fixture(scope="module")
def llama():
    return prepare_model(tiny_model("llama"), make_tokenizer(), "tiny-llama", torch.device("cpu"))


def _pairs(path: Path, foods: tuple[str, ...]) -> Path:
    rows = [{"input": f"name[{n}], food[{f}]", "target": f"{n} serves {f} food {k}."}
            for n in NAMES for f in foods for k in range(2)]  # two references per input
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def pairs_csv(tmp_path) -> Path:
    return _pairs(tmp_path / "pairs.csv", ("Thai", "Italian"))


@pytest.fixture
def shift_csv(tmp_path) -> Path:
    path = tmp_path / "shift.csv"
    pd.DataFrame({"input": ["name[Lost], food[Greek]", "name[Blue], food[Greek]"],
                  "target": ["Lost serves Greek food.", "Blue serves Greek food."]}).to_csv(
        path, index=False)
    return path


def _config(csv: Path) -> RunConfig:
    return RunConfig(train_csv=str(csv), text_column="input", target_column="target",
                     model="tiny-llama", max_length=64, device="cpu", validation_share=0.3,
                     eval_generate_inputs=1, prefix={"prefix_length": 4},
                     generation={"max_new_tokens": 4, "num_beams": 2},
                     training={"epochs": 1, "batch_size": 4, "learning_rate": 1e-2,
                               "patience": 0})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_generation_comparison_trains_each_method_on_the_same_pairs(tmp_path, pairs_csv,
                                                                     shift_csv, llama,
                                                                     monkeypatch):
    base = _weights(llama.model)
    built, prepared_calls, decoded = [], [], []
    real_build, real_prepare = contenders.build_trainable, compare_module.prepare_data
    real_generate = generation.generate_texts

    def build(name, loaded, **kwargs):
        trainable = real_build(name, loaded, **kwargs)
        built.append((name, trainable, trainable.state(), _weights(trainable.model)))
        return trainable

    def prepare(cfg):
        prepared_calls.append(cfg)
        return real_prepare(cfg)

    def generate_texts(model, tokenizer, kv, prompts, config):
        decoded.append(config)
        return real_generate(model, tokenizer, kv, prompts, config)

    monkeypatch.setattr(contenders, "build_trainable", build)
    monkeypatch.setattr(compare_module, "prepare_data", prepare)
    monkeypatch.setattr(generation, "generate_texts", generate_texts)
    cfg, out, events = _config(pairs_csv), tmp_path / "cmp", []
    result = run_comparison(cfg, CompareConfig(methods=["prefix", "prompt", "lora"],
                                               test_csv=str(pairs_csv),
                                               shift_csv=str(shift_csv)),
                            out, llama, on_event=events.append)

    assert len(prepared_calls) == 1  # one split for every method
    assert result["task"] == "generation" and result["data"]["labels"] == []
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["prefix", "prompt", "lora"]
    sizes = {"validation": (6, 3), "test": (20, 10), "shift": (2, 2)}  # (rows, inputs)
    for row in rows.values():
        for key, (n, inputs) in sizes.items():
            figures = row[key]
            assert tuple(figures) == GENERATION_SCORES, (row["method"], key)
            assert (figures["rows"], figures["inputs"]) == (n, inputs)
            assert all(0 <= figures[m] <= 100 for m in ("bleu", "chrf", "rouge_l"))
            assert figures["loss"] > 0
    # the same steps under the same rule, and every final decode with the run's settings
    assert rows["prefix"]["steps"] == rows["prompt"]["steps"] == rows["lora"]["steps"] > 0
    live = [c for c in decoded if c.num_beams == 1]  # each evaluation's greedy live BLEU
    assert live and all(c.max_new_tokens == 4 for c in live)
    assert {(c.num_beams, c.max_new_tokens) for c in decoded if c not in live} == {(2, 4)}
    assert [e for e in events if e["state"] == "done"][-1] == {
        "method": "lora", "state": "done", "metric": "bleu",
        "value": rows["lora"]["validation"]["bleu"]}

    # each method moved its own weights only; the shared model is untouched
    for name, trainable, before, inside in built:
        after = trainable.state()
        assert all(not torch.equal(before[k], after[k]) for k in before), name
        if name == "lora":
            for k, v in _weights(trainable.model).items():
                if "lora_" not in k:
                    torch.testing.assert_close(v, inside[k], rtol=0, atol=0, msg=k)
    assert [name for name, *_ in built] == ["prompt", "lora"]
    for k, v in _weights(llama.model).items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)

    # the prefix is a normal generation run; its report's bare model is the block's
    folder = RunFolder(out / "prefix")
    assert folder.read_config()["task"] == "generation"
    report = folder.read_report()
    bare = result["bare_model"]
    assert set(bare) == {"validation", "test", "shift"}
    assert all(tuple(bare[k]) == GENERATION_SCORES for k in bare)
    assert bare["validation"]["bleu"] == report["baselines"]["bare_model"]["bleu"]
    assert rows["prefix"]["validation"]["bleu"] == report["bleu"]
    assert (out / "lora" / "adapter_config.json").is_file()
    assert json.loads((out / "comparison.json").read_text()) == json.loads(
        json.dumps(result, default=str))

    table = format_table(result["rows"], "generation", bare).splitlines()
    assert table[0].split()[:3] == ["method", "val", "BLEU"]
    assert "test ROUGE-L" in table[0] and "shift chrF" in table[0] and "F1" not in table[0]
    assert table[-1].startswith("bare model")
    words = " ".join(result["verdict"])
    assert "test rows" in words and "one split and one seed" in words
    assert "the bare model (the same template, no training) scores BLEU" in words
    assert "sampling noise" not in words


def test_methods_that_classify_are_left_out_by_default_and_refused_when_named(
        tmp_path, pairs_csv, llama, monkeypatch):
    cfg = _config(pairs_csv)
    assert CompareConfig().methods_for(cfg) == ["prefix", "prompt", "lora", "ia3", "full"]
    classify = RunConfig(train_csv=str(pairs_csv), text_column="input", label_column="target")
    assert CompareConfig().methods_for(classify)[-2:] == ["probe", "tfidf"]
    trained = []
    monkeypatch.setattr(compare_module, "_train", lambda *a, **k: trained.append(a))
    out = tmp_path / "refused"
    with pytest.raises(ConfigError) as e:
        run_comparison(cfg, CompareConfig(methods=["prefix", "probe", "tfidf"]), out, llama)
    assert len(e.value.problems) == 1 and len(str(e.value).splitlines()) == 1
    assert "probe classifies" in str(e.value) and "tfidf classifies" in str(e.value)
    assert not trained and not out.exists()


@pytest.mark.parametrize("name", ["prompt", "lora", "ia3", "full"])
def test_each_method_decodes_through_the_cache_as_a_full_reread_does(name, llama):
    """The decode path (its own cache, left padding) on each method's model: LoRA and IA3
    inject layers into a copy, full fine-tuning trains a copy, prompt tuning gives key/values."""
    trainable = build_trainable(name, llama, prompt_ids=[5, 6, 7], prompt_length=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move every trained weight, so that the adapter is read
        for p in trainable.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        kv = trainable.key_values()
    model = trainable.model
    prompts = [[5, 17, 40, 3], [9], [100, 101, 102, 7]]
    got = greedy(model, kv, prompts, eos_id=0, pad_id=0, max_new_tokens=5)
    for prompt, ids in zip(prompts, got, strict=True):
        want: list[int] = []
        with torch.no_grad():
            for _ in range(5):
                x = torch.tensor([prompt + want])
                token = int(forward(model, kv, x, torch.ones_like(x))[0, -1].argmax())
                if token == 0:
                    break
                want.append(token)
        assert ids == want
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        bare = forward(llama.model, None, x, torch.ones_like(x))
        ours = forward(model, kv, x, torch.ones_like(x))
    assert not torch.allclose(bare, ours)  # the method's weights are in the decode


def _row(method: str, title: str, bleu: dict[str, float]) -> dict:
    def figures(key: str) -> dict | None:
        return None if key not in bleu else {"bleu": bleu[key], "chrf": bleu[key] + 10,
                                             "rouge_l": bleu[key] + 5, "loss": 2.0,
                                             "rows": 40, "inputs": 20}
    return {"method": method, "title": title, "validation": figures("validation"),
            "test": figures("test"), "shift": figures("shift"), "trainable_parameters": 10,
            "trainable_share": 0.01, "stored_bytes": 4096, "train_s_to_kept": 1.0,
            "train_s": 2.0, "examples_per_s": 5.0, "peak_rss_bytes": 2 ** 30, "kept_step": 3}


def test_generation_words_rank_by_test_bleu_against_the_prefix_and_the_bare_model():
    rows = [_row("prefix", "prefix tuning", {"validation": 30.0, "test": 20.0}),
            _row("lora", "LoRA", {"validation": 25.0, "test": 24.5}),
            _row("prompt", "prompt tuning", {"validation": 10.0, "test": 12.0}),
            {"method": "full", "title": "full fine-tuning", "error": "out of memory"}]
    bare = {"validation": _row("", "", {"validation": 5.0})["validation"],
            "test": _row("", "", {"test": 4.0})["test"], "shift": None}
    words = verdict(rows, has_test=True, has_shift=False, task="generation", bare=bare)
    assert words[0].startswith("LoRA scored best on the 40 test rows (20 inputs): BLEU 24.5, "
                               "4.5 points above prefix tuning (20.0)")
    assert "one split and one seed" in words[1]
    assert words[2].startswith("the prefix is 4.5 BLEU points behind LoRA and stores")
    assert words[3] == ("BLEU against the prefix (20.0): LoRA +4.5, prompt tuning -8.0")
    assert words[4] == ("the bare model (the same template, no training) scores BLEU 4.0 on "
                        "the test rows; training bought LoRA +20.5, prefix tuning +16.0, "
                        "prompt tuning +8.0 points over it")
    assert words[-1] == "did not finish: full fine-tuning (out of memory)"
    assert len(table_columns("generation")) == len(table_rows(rows, "generation", bare)[0])
    lines = format_table(rows, "generation", bare).splitlines()
    assert "shift" not in lines[0] and "test BLEU" in lines[0]
    assert lines[-1].split()[:6] == ["bare", "model", "5.0", "15.0", "10.0", "2.000"]
    cancelled = verdict(rows[:2], has_test=False, has_shift=False, task="generation",
                        bare=None)
    assert any("the bare model was not decoded" in w for w in cancelled)


def test_cli_compares_a_generation_csv_end_to_end(tmp_path, pairs_csv, model_dir, capsys):
    out = tmp_path / "cli"
    code = main(["compare", str(pairs_csv), "--text-column", "input", "--target-column",
                 "target", "--methods", "prefix,ia3,full", "--test-csv", str(pairs_csv),
                 "--model", str(model_dir), "--epochs", "1", "--max-new-tokens", "4",
                 "--seed", "1", "--output", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "[full] done validation BLEU " in captured.err
    lines = captured.out.splitlines()
    assert "val BLEU" in lines[0] and "test chrF" in lines[0] and "shift" not in lines[0]
    assert [line.split("  ")[0] for line in lines[2:6]] == [
        "prefix tuning", "IA3", "full fine-tuning", "bare model"]
    assert any(line.startswith("- ") and "BLEU" in line for line in lines)
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["task"] == "generation" and saved["methods_asked"] == ["prefix", "ia3", "full"]
    assert saved["bare_model"]["shift"] is None and saved["bare_model"]["test"]["rows"] == 20


def test_cli_refuses_a_classifier_on_a_generation_csv_in_one_line(tmp_path, pairs_csv,
                                                                  model_dir, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(pairs_csv), "--text-column", "input", "--target-column",
                 "target", "--methods", "prefix,probe", "--model", str(model_dir),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot compare these methods here: "
                                               "probe classifies")
    assert not out.exists()
