"""The command line, end to end on a tiny model saved as a local folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefixlab.cli.main import main
from prefixlab.data.reading import read_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rows = ["text,label"]
    for i in range(30):
        label = ["positive", "negative", "neither"][i % 3]
        rows.append(f"\"the movie was {'great' if i % 3 == 0 else 'bad'} {i}\",{label}")
    rows.append(",negative")  # an empty text: dropped with a warning, not fatal
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _train(csv_file, model_dir, out, *extra) -> int:
    return main(["train", str(csv_file), "--text-column", "text", "--label-column", "label",
                 "--output", str(out), "--model", str(model_dir), "--max-steps", "3",
                 "--batch-size", "4", "--prefix-length", "4", "--max-length", "48", *extra])


def test_train_evaluate_predict_export(tmp_path, csv_file, model_dir, capsys):
    run = tmp_path / "run"
    assert _train(csv_file, model_dir, run, "--init-text", "the movie") == 0
    err = capsys.readouterr().err
    assert "row 31" in err and "trainable parameters" in err
    # the final evaluation says how far it is, as training does
    assert "final report: scoring held-out rows without the prefix (zero-shot) 6/6" in err
    for name in ("config.json", "prefix.safetensors", "metrics.jsonl", "report.json",
                 "checkpoint.safetensors", "status.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["prefix"]["init_text"] == "the movie"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["type"] == "step"] == [1, 2, 3]

    assert main(["evaluate", str(run), str(csv_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "n"):
        assert key in report
    assert report["n"] == 30
    assert set(report["per_class"]["positive"]) == {"precision", "recall", "f1", "support"}
    assert report["confusion_matrix"]["labels"] == ["negative", "neither", "positive"]
    assert {"zero_shot", "tfidf"} <= set(report["baselines"])
    # adapted to the file's rows: said so, with the assumption, the baselines unchanged
    assert main(["evaluate", str(run), str(csv_file), "--json", "--adapt-prior", "em"]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert adapted["adapt_prior"]["how"] == "em" and "one distribution" in adapted[
        "adapt_prior"]["assumption"]
    assert adapted["baselines"]["tfidf"] == report["baselines"]["tfidf"]
    assert sum(adapted["adapt_prior"]["predicted_shares"].values()) == pytest.approx(1.0)

    assert main(["predict", str(run), "--text", "the movie was great"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["label"] in {"positive", "negative", "neither"}
    assert sum(line["probabilities"].values()) == pytest.approx(1.0)

    src = tmp_path / "in.csv"
    src.write_text("text\n=cmd|' /C calc'!A0\nthe movie was great\n\"an old\rmac file\"\n")
    out = tmp_path / "out.csv"
    assert main(["predict", str(run), "--csv", str(src), "--output", str(out)]) == 0
    written = out.read_text()
    assert "'=cmd" in written and "predicted_label" in written and "p_positive" in written
    # A cell holding a lone carriage return stays one cell of one row.
    assert read_table(out).frame["text"].tolist()[1:] == ["the movie was great", "an old\rmac file"]
    assert main(["predict", str(run), "--csv", str(src), "--output", str(out),
                 "--adapt-prior", "batch"]) == 0
    assert "p_positive" in out.read_text()

    assert main(["export", str(run), "--format", "peft", "--output",
                 str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    capsys.readouterr()
    assert main(["inspect", str(run), "--output", str(tmp_path / "insp"), "--bank-size",
                 "100", "--text", "the movie", "--knockout-rows", "4", "--ablation",
                 "both"]) == 0
    for name in ("nearest_tokens.json", "pca.json", "change.json", "knockout.json",
                 "knockout_reset.json", "summary.md", "inspection.html"):
        assert (tmp_path / "insp" / name).is_file(), name
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("**What training changed**: the ")
    assert said[1].startswith("**What still reads as the start**")

    # ... and back: the imported prefix predicts exactly what the run's own prefix does.
    assert main(["import-peft", str(tmp_path / "adapter"), "--output", str(tmp_path / "imp"),
                 "--labels", "positive,negative,neither", "--model", str(model_dir)]) == 0
    info = json.loads((tmp_path / "imp" / "config.json").read_text())
    assert info["imported_from"] == str(tmp_path / "adapter") and info["data"] == {}
    assert info["run"]["prefix"]["prefix_length"] == 4 and info["run"]["model"] == str(model_dir)
    assert info["prefix"]["trainable_parameters"] == info["prefix"]["inference_parameters"]
    capsys.readouterr()
    for folder in (run, tmp_path / "imp"):
        assert main(["predict", str(folder), "--text", "the movie was great"]) == 0
    own, imported = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert own["probabilities"] == pytest.approx(imported["probabilities"], abs=1e-5)
    # An imported prefix's start is unknown: the summary says so first.
    assert main(["inspect", str(tmp_path / "imp"), "--output", str(tmp_path / "insp-imp"),
                 "--bank-size", "100", "--knockout-rows", "0"]) == 0
    assert capsys.readouterr().out.startswith("**What training changed**: unknown — the "
                                              "prefix was imported")


def test_max_steps_zero_saves_the_initialized_prefix(tmp_path, csv_file, model_dir):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert _train(csv_file, model_dir, run, "--max-steps", "0") == 0
    kv = load_file(run / "prefix.safetensors")["key_values"]
    init = load_file(run / "snapshots" / "step_000000.safetensors")["key_values"]
    assert kv.shape[3] == 4 and (kv == init).all()


def test_train_trying_a_second_learning_rate_says_which_it_kept(tmp_path, csv_file,
                                                                  model_dir, capsys):
    run = tmp_path / "run"
    assert _train(csv_file, model_dir, run, "--try-learning-rates", "0.05") == 0
    out = capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    chosen = config["run"]["training"]["learning_rate"]
    assert chosen in (0.005, 0.05) and config["learning_rate_choice"]["tried"] == [0.005, 0.05]
    assert f"Learning rate {chosen:g}, chosen on the validation rows: macro-F1" in out
    assert (run / "trials" / "lr-0.05" / "prefix.safetensors").is_file()
    # the run reads as one trained at the chosen rate
    assert main(["evaluate", str(run), str(csv_file), "--json"]) == 0


def test_bad_csv_is_refused_before_a_run_exists(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\nhello,a\nworld,b\n")
    run = tmp_path / "run"
    code = main(["train", str(bad), "--text-column", "text", "--label-column", "label",
                 "--output", str(run), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and not run.exists()
    assert "sentence" in err and "category" in err  # it lists the columns that exist
    assert len(err.strip().splitlines()) == 1


def test_existing_output_is_not_overwritten(tmp_path, csv_file, model_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    assert _train(csv_file, model_dir, run) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "mine"


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    missing = tmp_path / "nope.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "prefixlab", "validate", str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_predict_ensemble_averages_the_runs_probabilities(tmp_path, csv_file, model_dir,
                                                          capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(csv_file, model_dir, a) == 0
    assert _train(csv_file, model_dir, b, "--seed", "1") == 0
    capsys.readouterr()
    text = "the movie was great"
    assert main(["predict", "--run", str(a), "--run", str(b), "--text", text]) == 0
    each = [json.loads(x)["probabilities"] for x in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--run", str(a), "--run", str(b), "--text", text,
                 "--ensemble"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(line["runs"]) == 2
    for label, p in line["probabilities"].items():
        assert p == pytest.approx((each[0][label] + each[1][label]) / 2, abs=1e-6)
    # an ensemble of one run twice is the run
    assert main(["predict", "--run", str(a), "--run", str(a), "--text", text,
                 "--ensemble"]) == 0
    (same,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert same["probabilities"] == pytest.approx(each[0], abs=1e-6)
