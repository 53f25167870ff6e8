"""Settings and user errors: RunConfig reports every problem of every part at once, and every
error a user can fix is a PrefixLabError (what the CLI and the app show as one line)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

from prefixlab.cli.main import main
from prefixlab.data.reading import DataError
from prefixlab.engine.encode import Template, TemplateError
from prefixlab.engine.models import ModelLoadError
from prefixlab.engine.peft_interop import PeftFormatError
from prefixlab.engine.prefix import PrefixConfig, PrefixFileError
from prefixlab.engine.train import TrainConfig
from prefixlab.errors import USER_ERRORS, ConfigError, PrefixLabError
from prefixlab.interpret.frame import InterpretError
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunError


def test_every_user_error_is_a_prefixlab_error():
    for error in (ConfigError, TemplateError, DataError, RunError, InterpretError,
                  ModelLoadError, PeftFormatError, PrefixFileError):
        assert issubclass(error, PrefixLabError), error
        assert issubclass(error, USER_ERRORS), error


def test_every_public_exception_in_prefixlab_is_a_prefixlab_error():
    """A new error type joins the family, so the CLI and the app show it as one line; only
    private ones (a leading underscore: control flow, never shown) may stand apart."""
    import prefixlab

    found = {}
    for info in pkgutil.walk_packages(prefixlab.__path__, "prefixlab."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not name.startswith("_")):
                found[f"{info.name}.{name}"] = obj
    assert "prefixlab.data.reading.DataError" in found  # the walk saw the package
    outside = sorted(name for name, obj in found.items() if not issubclass(obj, PrefixLabError))
    assert not outside, f"not derived from PrefixLabError: {outside}"


def test_nested_configs_raise_config_error_with_every_problem():
    with pytest.raises(ConfigError) as e:
        TrainConfig(learning_rate=0, epochs=0)
    assert len(e.value.problems) == 2
    assert "learning_rate" in e.value.problems[0] and "epochs" in e.value.problems[1]
    with pytest.raises(ConfigError) as e:
        PrefixConfig(prefix_length=0)
    assert e.value.problems == ["prefix_length must be 1..512, got 0"]
    with pytest.raises(ConfigError) as e:
        Template("no text field")
    assert isinstance(e.value, TemplateError) and "{text}" in e.value.problems[0]


def test_run_config_collects_problems_of_every_nested_config():
    data = {"train_csv": "x.csv", "max_length": 4, "template": "no slot",
            "prefix": {"prefix_length": 0}, "training": {"epochs": 0, "batch_size": 0}}
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    problems = e.value.problems
    for expected in ("prefix_length must be", "epochs must be", "batch_size must be",
                     "max_length must be", "{text} exactly once"):
        assert sum(expected in p for p in problems) == 1, (expected, problems)
    assert len(problems) == 5
    # the same when built directly with dicts (how the CLI and the app build it)
    with pytest.raises(ConfigError) as direct:
        RunConfig(**data)
    assert direct.value.problems == problems


def test_unknown_nested_settings_are_named():
    with pytest.raises(ConfigError, match="unknown training settings: epoch, lr") as e:
        RunConfig(train_csv="x.csv", training={"epoch": 2, "lr": 1.0},
                  prefix={"prefix_length": 0})
    assert len(e.value.problems) == 2


def test_config_error_survives_a_process_boundary():
    error = pickle.loads(pickle.dumps(ConfigError(["a is wrong", "b is wrong"])))
    assert error.problems == ["a is wrong", "b is wrong"] and str(error) == "a is wrong; b is wrong"


def test_cli_reports_every_settings_problem_on_a_line_of_its_own(tmp_path, capsys):
    code = main(["train", str(tmp_path / "x.csv"), "--output", str(tmp_path / "run"),
                 "--epochs", "0", "--prefix-length", "0", "--max-length", "4",
                 "--weight-decay", "-1", "--grad-clip", "-1"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("error: ") for line in lines)
    for expected in ("epochs must be", "prefix_length must be", "max_length must be",
                     "weight_decay must be", "grad_clip must be"):
        assert sum(expected in line for line in lines) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", [{"weight_decay": -1.0}, {"weight_decay": float("nan")},
                                     {"grad_clip": -1.0}, {"grad_clip": float("inf")},
                                     {"max_minutes": float("nan")}])
def test_numeric_settings_out_of_range_are_refused(setting):
    with pytest.raises(ConfigError, match=next(iter(setting))):
        TrainConfig(**setting)
