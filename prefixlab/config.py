"""Run settings: what to train on, which model, and how. Saved as config.json in a run folder.

The prefix and optimizer settings are `PrefixConfig` (prefix.py) and `TrainConfig` (train.py),
next to the code they configure; `RunConfig` ties them to data, model and template.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prefixlab.encode import DEFAULT_TEMPLATE, Template, TemplateError
from prefixlab.models import DEFAULT_MODEL
from prefixlab.prefix import PrefixConfig
from prefixlab.train import TrainConfig


class ConfigError(ValueError):
    """Settings that cannot be used; the message lists every problem."""


@dataclass
class RunConfig:
    """One training run."""

    train_csv: str
    text_column: str | None = None
    """None guesses the column from its name or content."""
    label_column: str | None = None
    validation_csv: str | None = None
    """Held-out data; without it a stratified share of train_csv is held out."""
    validation_share: float = 0.2
    max_train_examples: int | None = None
    """A stratified, seeded sample of the training rows; a CPU step costs ~0.3 s per example."""
    max_eval_examples: int | None = 500
    """Held-out rows scored per evaluation: each costs one forward pass per label set."""
    model: str = DEFAULT_MODEL
    template: str = DEFAULT_TEMPLATE
    max_length: int = 128
    """Tokens per prompt + label; longer texts are cut (and counted in a warning)."""
    task: str | None = None
    """A short task description; with the label names it makes the default init text."""
    device: str | None = None
    """None picks CUDA when present, else CPU."""
    trust_remote_code: bool = False
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.prefix, dict):
            self.prefix = PrefixConfig(**self.prefix)
        if isinstance(self.training, dict):
            self.training = TrainConfig(**self.training)
        problems = []
        if not 0.0 < self.validation_share < 0.9:
            problems.append(f"validation_share must be in (0, 0.9), got {self.validation_share}")
        if not 16 <= self.max_length <= 8192:
            problems.append(f"max_length must be 16..8192, got {self.max_length}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                problems.append(f"{name} must be at least 2 or unset, got {value}")
        try:
            Template(self.template)
        except TemplateError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown settings in config: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"config does not fit RunConfig: {e}") from e
        except ValueError as e:
            raise ConfigError(str(e)) from e
