"""The CLI's settings come from the dataclasses: same defaults, docstrings as help, every field."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields

import pytest

from prefixlab.cli.main import build_parser
from prefixlab.cli.options import add_options, field_docs, given
from prefixlab.cli.training import _run_config
from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.train import TrainConfig
from prefixlab.runs.config import RunConfig

NESTED = ("train_csv", "prefix", "training", "generation")


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", "data.csv", "--output", "out", *extra])


def test_no_options_gives_the_dataclass_defaults():
    assert _run_config(_train_args()).to_dict() == RunConfig(train_csv="data.csv").to_dict()


def test_every_setting_is_an_option_with_its_docstring_as_help():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"]
                         .format_help().split())
    for cls in (RunConfig, PrefixConfig, TrainConfig):
        for f in fields(cls):
            if f.name in NESTED:
                continue
            assert "--" + f.name.replace("_", "-") in help_text, f.name
            doc = field_docs(cls).get(f.name)
            if doc:
                assert doc in help_text, f.name
    assert "(default: 0.005)" in help_text  # TrainConfig.learning_rate's default, not restated


def test_options_reach_every_part_of_the_config():
    cfg = _run_config(_train_args(
        "--text-column", "t", "--validation-share", "0.3", "--max-eval-examples", "7",
        "--device", "cpu", "--trust-remote-code", "--prefix-length", "4", "--init", "zero",
        "--reparameterize", "--reparam-hidden", "32", "--learning-rate", "0.01",
        "--epochs", "3", "--max-steps", "0", "--weight-decay", "0.1", "--seed", "5",
        "--prefix-dropout", "0.2", "--try-learning-rates", "0.02, 0.05",
    ))
    assert (cfg.text_column, cfg.validation_share, cfg.max_eval_examples, cfg.device,
            cfg.trust_remote_code) == ("t", 0.3, 7, "cpu", True)
    assert (cfg.prefix.prefix_length, cfg.prefix.init, cfg.prefix.reparameterize,
            cfg.prefix.reparam_hidden) == (4, "zero", True, 32)
    assert (cfg.training.learning_rate, cfg.training.epochs, cfg.training.max_steps,
            cfg.training.weight_decay, cfg.training.seed, cfg.training.prefix_dropout
            ) == (0.01, 3, 0, 0.1, 5, 0.2)
    assert cfg.training.learning_rates() == [0.01, 0.02, 0.05]
    assert cfg.training.batch_size == TrainConfig().batch_size  # not given: the default


def test_init_text_implies_a_text_init():
    cfg = _run_config(_train_args("--init", "random", "--init-text", "the movie"))
    assert (cfg.prefix.init, cfg.prefix.init_text) == ("text", "the movie")


def test_choices_and_types_come_from_the_annotations(capsys):
    with pytest.raises(SystemExit):
        _train_args("--init", "ones")
    assert "invalid choice: 'ones'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train_args("--epochs", "two")
    assert "invalid int value: 'two'" in capsys.readouterr().err


@dataclass
class _Demo:
    plain: int = 3
    """A number,
    over two lines (100% of it)."""
    switch_on: bool = True
    names: list[str] = dataclasses.field(default_factory=list)
    either: int | str | None = None


def test_field_docs_switches_and_unreadable_types():
    assert field_docs(_Demo) == {"plain": "A number, over two lines (100% of it)."}
    parser = argparse.ArgumentParser()
    names = add_options(parser, _Demo, skip=("names", "either"))
    assert names == ["plain", "switch_on"]
    assert given(parser.parse_args([]), names) == {}
    assert given(parser.parse_args(["--no-switch-on", "--plain", "4"]), names) == {
        "plain": 4, "switch_on": False}
    assert "100% of it" in parser.format_help()
    with pytest.raises(TypeError, match=r"_Demo\.names: the CLI cannot read"):
        add_options(argparse.ArgumentParser(), _Demo)
    with pytest.raises(TypeError, match=r"_Demo\.either: the CLI cannot read"):
        add_options(argparse.ArgumentParser(), _Demo, skip=("names",))


def test_a_preset_is_the_apps_recipe_and_typed_options_win_over_it():
    from prefixlab.runs.presets import PRESETS
    from prefixlab.workbench.runs import run_config

    app = run_config("data.csv", None, None, PRESETS["Thorough"]).to_dict()
    cli = _run_config(_train_args("--preset", "thorough")).to_dict()
    assert cli == app
    assert (cli["training"]["max_minutes"], cli["max_train_examples"]) == (60, None)
    edited = _run_config(_train_args("--preset", "quick", "--epochs", "5", "--max-length", "64"))
    assert (edited.training.epochs, edited.max_length) == (5, 64)
    assert edited.training.max_minutes == PRESETS["Quick look"]["max_minutes"]
    assert edited.max_train_examples == PRESETS["Quick look"]["max_train_examples"]
