"""`compare --set KEY=VALUE`: the run settings every method shares (and the prefix's own),
so a comparison can show which prefix settings close a gap; a bad key is refused in one line
before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixlab.cli.main import main
from prefixlab.cli.options import dotted_settings
from prefixlab.errors import ConfigError
from tests.conftest import save_tiny_model
from tests.test_compare import csv_file  # noqa: F401 - a fixture, shared

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def test_dotted_settings_sort_keys_into_sections_and_read_json_values():
    parts = dotted_settings(["prefix.prefix_length=20", "training.learning_rate=3e-3",
                             "decision=argmax", "prefix.reparameterize=true",
                             "prefix.init=the words, as text"])
    assert parts == {"run": {"decision": "argmax"},
                     "prefix": {"prefix_length": 20, "reparameterize": True,
                                "init": "the words, as text"},
                     "training": {"learning_rate": 0.003}, "generation": {}}
    for bad in ["prefix_length", "model.layers=2", "prefix.=3", "run.decision=argmax"]:
        with pytest.raises(ConfigError, match="--set wants KEY=VALUE"):
            dotted_settings([bad])


def test_compare_trains_the_prefix_with_the_settings_given(tmp_path, csv_file,  # noqa: F811
                                                          tiny_dir):
    out = tmp_path / "out"
    assert main(["compare", str(csv_file), "--text-column", "text", "--label-column", "label",
                 "--model", str(tiny_dir), "--device", "cpu", "--methods", "prefix,tfidf",
                 "--epochs", "1", "--set", "prefix.prefix_length=3",
                 "--set", "training.learning_rate=0.02", "--set", "training.batch_size=8",
                 "--set", "max_length=40", "--output", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["run"]["prefix"]["prefix_length"] == 3
    assert result["run"]["training"]["learning_rate"] == 0.02
    assert result["run"]["max_length"] == 40
    prefix = next(r for r in result["rows"] if r["method"] == "prefix")
    assert prefix["settings"]["prefix_length"] == 3
    assert prefix["settings"]["learning_rate"] == 0.02
    run = json.loads((out / "prefix" / "config.json").read_text())
    assert run["run"]["prefix"]["prefix_length"] == 3
    assert run["run"]["training"]["batch_size"] == 8


def test_a_prefix_choosing_its_learning_rate_is_timed_for_every_rate_it_tried(
        tmp_path, csv_file, tiny_dir):  # noqa: F811
    out = tmp_path / "out"
    assert main(["compare", str(csv_file), "--text-column", "text", "--label-column", "label",
                 "--model", str(tiny_dir), "--device", "cpu", "--methods", "prefix",
                 "--epochs", "1", "--set", "training.try_learning_rates=0.05",
                 "--output", str(out)]) == 0
    prefix = json.loads((out / "comparison.json").read_text())["rows"][0]
    report = json.loads((out / "prefix" / "report.json").read_text())
    assert prefix["settings"]["learning_rate"] == report["learning_rate"]
    steps = [[json.loads(line) for line in (out / "prefix" / "trials" / f"lr-{rate:g}" /
                                            "metrics.jsonl").read_text().splitlines()
              if '"type": "step"' in line] for rate in (0.005, 0.05)]
    assert prefix["train_s"] == pytest.approx(  # both trials' training time
        steps[0][-1]["elapsed_s"] + steps[1][-1]["elapsed_s"], rel=1e-6)
    assert prefix["train_s_to_kept"] <= prefix["train_s"]


@pytest.mark.parametrize("item, message", [
    ("prefix.prefix_lenght=3", "prefix_lenght"),
    ("colour=red", "no run setting named colour"),
    ("training.learning_rate=-1", "learning_rate"),
])
def test_a_bad_setting_is_refused_in_one_line_before_anything_loads(tmp_path, item,
                                                                     message, capsys,
                                                                     csv_file):  # noqa: F811
    out = tmp_path / "out"
    assert main(["compare", str(csv_file), "--text-column", "text", "--label-column", "label",
                 "--model", str(tmp_path / "no-such-model"), "--set", item,
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_the_prefix_trains_the_whole_budget_as_every_method_does(tmp_path, csv_file,  # noqa: F811
                                                                 monkeypatch):
    """A run keeps a share of its time budget for its final report; in a comparison the
    prefix trains the whole budget and is scored after it, as the other methods are."""
    import torch

    from prefixlab.engine.models import prepare_model
    from prefixlab.runs import experiment
    from prefixlab.runs.compare import CompareConfig, run_comparison
    from prefixlab.runs.config import RunConfig
    from tests.conftest import make_tokenizer, tiny_model

    reserves = []
    real_train = experiment.train

    def spy(*args, reserve_s=None, **kwargs):
        reserves.append(reserve_s)
        return real_train(*args, reserve_s=reserve_s, **kwargs)

    monkeypatch.setattr(experiment, "train", spy)
    loaded = prepare_model(tiny_model("llama"), make_tokenizer(), "tiny-llama",
                           torch.device("cpu"))
    cfg = RunConfig(train_csv=str(csv_file), text_column="text", label_column="label",
                    model="tiny-llama", max_length=48, device="cpu",
                    prefix={"prefix_length": 4},
                    training={"epochs": 1, "batch_size": 8, "max_minutes": 5.0})
    run_comparison(cfg, CompareConfig(methods=["prefix"]), tmp_path / "cmp", loaded)
    assert reserves == [None, None]  # one training per learning rate tried, none reserving
    reserves.clear()

    from prefixlab.runs.experiment import create_run, execute_run, prepare_data

    prepared = prepare_data(cfg)  # a run of its own keeps the report's share
    execute_run(create_run(cfg, tmp_path / "run", prepared, loaded), loaded, prepared=prepared)
    assert len(reserves) == 2 and all(r is not None and r() >= 0 for r in reserves)
