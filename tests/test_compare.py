"""Comparing methods (runs/compare.py, engine/methods.py): each trains only its own weights,
all share one split, encoder and decision rule, their counts and sizes are right, and a
method that cannot run is refused before anything trains."""

from __future__ import annotations

import csv
import json
import threading
import time
import zipfile
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
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.presets import PRESETS, SETTING_NAMES
from prefixlab.ui import compare_tab
from prefixlab.workbench import Workbench
from prefixlab.workbench.comparing import ComparisonError
from tests.conftest import LABELS, TEXTS, make_tokenizer, save_tiny_model, tiny_model

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


def test_cancel_mid_training_writes_only_what_finished(tmp_path, csv_file, llama):
    asked = []

    def should_stop() -> bool:  # the between-methods checks, then a few prefix steps
        asked.append(1)
        return len(asked) > 4

    out = tmp_path / "cancelled"
    result = run_comparison(_config(csv_file), CompareConfig(methods=["tfidf", "prefix",
                                                                      "lora"]),
                            out, llama, should_stop=should_stop)
    assert [r["method"] for r in result["rows"]] == ["tfidf"]
    assert result["cancelled"] == "prefix" and result["not_run"] == ["prefix", "lora"]
    assert "not run: prefix tuning, LoRA" in result["verdict"][-1]
    assert json.loads((out / "comparison.json").read_text()) == json.loads(
        json.dumps(result, default=str))
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "prefix"]
    # the stopped prefix is a normal cancelled run (as Cancel in Runs leaves one), no row
    assert RunFolder(out / "prefix").status()["state"] == "cancelled"


# --- the app: workbench/comparing.py and ui/compare_tab.py ------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def _settings() -> list:
    return [{**PRESETS["Quick look"], "prefix_length": 4, "max_minutes": 0.5}[k]
            for k in SETTING_NAMES]


def _start(wb: Workbench, csv: Path, methods: list[str], test=None, shift=None) -> tuple:
    state = {"path": str(csv), "name": csv.name, "text": "text", "label": "label"}
    return compare_tab.on_compare(wb, state, methods, "", test, shift, *_settings())


def _finished(wb: Workbench, cid: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while (status := wb.comparison(cid))["state"] == "running":
        assert time.monotonic() < end, f"comparison {cid} still running: {status}"
        time.sleep(0.2)
    return status


def _value(update):
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def test_app_compares_with_test_and_shift_then_lists_and_offers_downloads(tmp_path, tiny_dir,
                                                                          csv_file):
    wb = Workbench(tmp_path / "data", model=str(tiny_dir))
    test = tmp_path / "upload" / "test.csv"
    test.parent.mkdir()
    test.write_text(csv_file.read_text())
    shift = tmp_path / "upload" / "shift.csv"
    shift.write_text("text,label\nsome film was great,positive\nsome film was bad,negative\n")
    plain = _start(wb, csv_file, ["prefix", "lora"])[0]
    time.sleep(1.1)  # ids carry the second they began
    cid, past, *_ = _start(wb, csv_file, ["prefix", "lora", "probe"], str(test), str(shift))
    assert _value(past) == cid
    test.unlink()  # the upload's temporary file may go: the comparison kept its copy
    shift.unlink()
    assert _finished(wb, cid)["state"] == "completed" and _finished(wb, plain)
    progress, table, chart, verdict, files, cancel, timer = compare_tab.on_tick(wb, cid)
    assert "Comparison finished" in progress and not cancel["visible"]
    frame = _value(table)
    assert {"test F1", "shift F1"} <= set(frame.columns) and len(frame) == 3
    assert (frame["shift F1"] != "-").all() and chart["visible"] and "Verdict" in verdict
    names = sorted(Path(f).name for f in _value(files))
    assert names == sorted([f"{cid}-table.csv", f"{cid}-comparison.json",
                            f"{cid}-prefix.zip", f"{cid}-lora.zip"])
    by_name = {Path(f).name: Path(f) for f in _value(files)}
    with zipfile.ZipFile(by_name[f"{cid}-lora.zip"]) as z:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
    with zipfile.ZipFile(by_name[f"{cid}-prefix.zip"]) as z:
        assert "prefix.safetensors" in z.namelist()
    rows = list(csv.DictReader(by_name[f"{cid}-table.csv"].open()))
    assert [r["method"] for r in rows] == ["prefix", "lora", "probe"]
    assert all(float(r["shift_macro_f1"]) >= 0 and r["stored_bytes"] for r in rows)

    # the app restarts: a new workbench lists both, newest first, and shows each again
    again = Workbench(tmp_path / "data", model=str(tiny_dir))
    assert compare_tab.past_choices(again)["choices"] == [cid, plain]
    shown_cid, progress, table, *_ = compare_tab.on_pick(again, plain)
    assert shown_cid == plain and "Comparison finished" in progress
    assert "test F1" not in _value(table).columns  # no test or shift CSV: no such columns
    assert compare_tab.on_pick(again, None)[0] is None


def test_app_cancels_a_comparison_between_methods(tmp_path, tiny_dir, csv_file, monkeypatch):
    wb = Workbench(tmp_path / "data", model=str(tiny_dir))
    real_probe, cancelled = compare_module.train_probe, threading.Event()

    def probe(*args, **kwargs):  # the probe ends only once Cancel was pressed
        assert cancelled.wait(60)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(compare_module, "train_probe", probe)
    cid, *_ = _start(wb, csv_file, ["probe", "prefix", "tfidf"])
    while wb.comparison(cid)["methods"]["probe"]["state"] != "training":
        time.sleep(0.05)
    progress, *_, cancel, timer = compare_tab.on_cancel(wb, cid)
    assert progress.startswith("Cancelling") and not cancel["interactive"]
    cancelled.set()
    status = _finished(wb, cid)
    assert status["state"] == "cancelled"
    assert status["result"]["not_run"] == ["prefix", "tfidf"]
    progress, table, _, verdict, files, cancel, timer = compare_tab.on_tick(wb, cid)
    assert progress.startswith("Comparison cancelled: 1 of 3 methods finished (linear probe)")
    assert progress.count("not run") == 2 and "not run: prefix tuning, TF-IDF" in verdict
    assert list(_value(table)["method"]) == ["linear probe"] and not cancel["visible"]
    assert sorted(Path(f).name for f in _value(files)) == [f"{cid}-comparison.json",
                                                           f"{cid}-table.csv"]
    assert not (wb.store.runs_dir / f"{cid}-prefix").exists()  # the prefix never began
    with pytest.raises(ComparisonError, match="cancelled; only a running one"):
        compare_tab.on_cancel(wb, cid)


def test_a_comparison_left_running_by_another_process_reads_as_interrupted(tmp_path,
                                                                            tiny_dir):
    wb = Workbench(tmp_path / "data", model=str(tiny_dir))
    folder = wb.comparisons_dir / "old-20240101-000000"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps({
        "state": "running", "pid": -1, "started": 1.0,
        "methods": {"prefix": {"state": "training", "step": 3, "total_steps": 9,
                               "elapsed_s": 1.0}, "lora": {"state": "waiting"}}}))
    progress, table, _, _, files, cancel, timer = compare_tab.on_pick(wb, folder.name)[1:]
    assert progress.startswith("Comparison interrupted")
    assert "prefix tuning**: interrupted" in progress and "LoRA**: not run" in progress
    assert not table["visible"] and not files["visible"] and not cancel["visible"]
    with pytest.raises(ComparisonError):
        wb.cancel_comparison(folder.name)
    with pytest.raises(FileNotFoundError):
        wb.comparison("../runs")
