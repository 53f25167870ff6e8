"""The benchmark's code paths on tiny models (the shortcuts it measures are tested in
test_llama_cpu.py, test_cpu.py and test_train.py).

The bench itself runs both contenders on a tiny model in-process (no subprocess, no real
model) and must print a machine-readable summary. One slow test runs the real command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from prefixlab.bench import contenders, machine, speed, task
from prefixlab.bench.report import disturbance_warning, format_report
from prefixlab.data.labeled import LabeledData
from prefixlab.engine import llama_cpu

from .conftest import LABELS, TEXTS, tiny_model

# PEFT 0.21.2 on transformers 5.24 passes `past_key_values` (a FutureWarning, made an error by
# the project's pytest settings); its forward still honours it.
tolerate_peft = pytest.mark.filterwarnings(
    "ignore:`past_key_values` is deprecated:FutureWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)



def _tiny_data(n: int = 40) -> LabeledData:
    texts = [TEXTS[i % len(TEXTS)] + " " * (i % 3) + "!" * (i % 4) for i in range(n)]
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    return LabeledData(texts, labels, list(range(1, n + 1)), ["negative", "positive"], [],
                       "text", "label")


@tolerate_peft
def test_both_contenders_run_and_score_the_same_prefix_alike(tokenizer):
    from prefixlab.engine.models import prepare_model

    cfg = task.BenchConfig(rows=16, eval_rows=12, epochs=2, batch_size=4, prefix_length=4,
                           max_length=48, warmup_steps=2, score_batch_size=5, gen_rows=4,
                           gen_tokens=6)
    data = _tiny_data()
    runs = {}
    for name in task.CONTENDERS:  # a fresh model each: PEFT wraps the one it gets
        loaded = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama",
                               torch.device("cpu"))
        runs[name] = [speed.run_worker(name, cfg, loaded=loaded, data=data)]
        json.dumps(runs[name][0])  # what a worker prints must be JSON
    ours, peft = runs["ours"][0], runs["peft"][0]
    assert ours["train_rows"] == peft["train_rows"] == 16
    assert ours["train"]["examples"] == peft["train"]["examples"] == 32
    # the same rows: the same non-padding tokens; PEFT pads to each random batch's longest
    assert ours["train"]["real_tokens"] == peft["train"]["real_tokens"]
    assert peft["train"]["padded_tokens"] >= peft["train"]["real_tokens"]
    # PEFT's forward and score_labels read one prefix the same way
    assert peft["agreement"]["labels"] == 1.0
    assert peft["agreement"]["max_abs_prob_diff"] < 1e-4

    report = format_report(cfg, runs, [100.0, 110.0, 90.0])
    last = report.strip().splitlines()[-1]
    assert re.fullmatch(
        r"summary: train_speedup=\d+\.\d\d score_speedup=\d+\.\d\d flop_utilization=\d+\.\d\d "
        r"peak_rss_gb=\d+\.\d\d macro_f1_ours=\d\.\d\d macro_f1_peft=\d\.\d\d "
        r"label_agreement=\d\.\d\d app_start_s=nan", last)
    assert "flop_utilization" in report and ("MISSED" in report or "met" in report)
    assert re.search(r"app_start_s +nan +<= 8 +not measured", report)

    # one speed-up switched off per ablation row; the same rows, the same loss function
    loaded = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", torch.device("cpu"))
    ablations = {v: speed.run_worker("ours", task.BenchConfig(**{**vars(cfg), "variant": v}),
                                     loaded=loaded, data=data)
                 for v in ("generic", "unbucketed")}
    assert llama_cpu.lean_supported(loaded.model)  # switched back on after the variant
    assert ablations["generic"]["train"]["real_tokens"] == ours["train"]["real_tokens"]
    unbucketed = ablations["unbucketed"]["train"]
    assert unbucketed["padded_tokens"] > ours["train"]["padded_tokens"]
    # generic and lean steps are the same maths: the same batches give the same losses
    assert abs(ablations["generic"]["train"]["final_loss"]
               - ours["train"]["final_loss"]) < 1e-4
    # ours in bfloat16 beside float32: training, scoring and generation, with the ratio
    assert ours["precision"] == "float32"
    assert ours["generate"]["tokens"] == cfg.gen_rows * cfg.gen_tokens  # EOS ends no row
    bf16 = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", torch.device("cpu"),
                         torch.bfloat16)
    ablations["precision bfloat16"] = speed.run_worker(
        "ours", task.BenchConfig(**{**vars(cfg), "precision": "bfloat16"}), loaded=bf16,
        data=data)
    assert ablations["precision bfloat16"]["generate"]["tokens"] == cfg.gen_rows * cfg.gen_tokens
    report = format_report(cfg, runs, [100.0], ablations, [20.0, 5.5])
    table = report[report.index("ours in each precision"):].splitlines()
    assert "CPU bfloat16 instructions: " in table[0]
    assert re.fullmatch(r" +float32 +bfloat16 +bfloat16/float32", table[1])
    for row in ("training examples/s", "scoring examples/s", "generation tokens/s"):
        assert any(re.fullmatch(rf"{row} +\d+\.\d+ +\d+\.\d+ +\d+\.\d\dx", line)
                   for line in table[2:5]), row
    assert "without the lean Llama step" in report and "without length bucketing" in report
    assert "5.5 s (second start" in report and re.search(r"app_start_s +5\.500 +<= 8 +met",
                                                          report)
    assert report.strip().endswith("app_start_s=5.5")


def test_app_start_is_timed_to_a_served_page(tmp_path):
    """_app_start_seconds waits for HTTP 200 from the launched script and stops it."""
    server = tmp_path / "app.py"
    server.write_text(
        "import argparse, http.server, time\n"
        "p = argparse.ArgumentParser(); p.add_argument('--port', type=int)\n"
        "p.add_argument('--data-dir'); a = p.parse_args()\n"
        "time.sleep(0.5)\n"
        "http.server.HTTPServer(('127.0.0.1', a.port),"
        " http.server.SimpleHTTPRequestHandler).serve_forever()\n")
    seconds = machine._app_start_seconds(server, tmp_path, None, timeout=30)
    assert 0.5 <= seconds < 30
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit('no model here')\n")
    with pytest.raises(RuntimeError, match="exited with 1 before serving:\n.*no model here"):
        machine._app_start_seconds(broken, tmp_path, None, timeout=30)


def test_peft_layout_round_trips():
    kv = torch.randn(3, 2, 2, 5, 4)  # (L, 2, H_kv, P, D)
    flat = contenders.peft_embeddings(kv)
    assert flat.shape == (5, 3 * 2 * 2 * 4)
    torch.testing.assert_close(contenders.peft_key_values(flat, kv), kv)


def test_config_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="rows must be at least 1.*epochs must be at least 1"):
        task.BenchConfig(rows=0, epochs=0)
    with pytest.raises(ValueError, match="gen_rows must be at least 0.*gen_tokens must be"):
        task.BenchConfig(gen_rows=-1, gen_tokens=0)


@pytest.mark.slow
def test_quick_bench_prints_a_machine_readable_last_line(shared_data):
    cmd = [sys.executable, "-m", "prefixlab.bench.speed", "--quick", "--rows", "16", "--eval-rows",
           "12", "--data-dir", str(shared_data), "--no-app"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: train_speedup=")
    values = dict(kv.split("=") for kv in last.removeprefix("summary: ").split())
    assert set(values) == {"train_speedup", "score_speedup", "flop_utilization", "peak_rss_gb",
                           "macro_f1_ours", "macro_f1_peft", "label_agreement", "app_start_s"}
    assert float(values["label_agreement"]) == 1.0


def test_a_disturbed_machine_is_named_in_the_report():
    assert disturbance_warning([180.0, 185.0, 176.0, 190.0]) == []
    (line,) = disturbance_warning([180.0, 47.0, 176.0, 190.0])
    assert line.startswith("WARNING: the matmul peak fell to 26% of its median")

