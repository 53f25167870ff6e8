"""Run settings: what to train on, which model, and how. Saved as config.json in a run folder.

The prefix and optimizer settings are `PrefixConfig` (prefix.py) and `TrainConfig`
(train_config.py, beside the loop that reads it); `RunConfig` ties them to data, model and
template. Each raises ConfigError with the list of its problems; RunConfig built from dicts
(config.json, the CLI, the app) gathers the problems of every part and raises once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from prefixlab.engine.balance import DECISIONS, LABEL_SCORES, Decision, LabelScores, label_rule
from prefixlab.engine.decode import DecodeConfig
from prefixlab.engine.distributed import MAX_PROCESSES
from prefixlab.engine.encode import DEFAULT_GENERATION_TEMPLATE, DEFAULT_TEMPLATE, Encoder, Template
from prefixlab.engine.models import DEFAULT_MODEL
from prefixlab.engine.precision import PrecisionName, check_precision
from prefixlab.engine.prefix import PrefixConfig
from prefixlab.engine.train import TrainConfig
from prefixlab.errors import ConfigError

__all__ = ["ConfigError", "RunConfig"]  # ConfigError is defined in errors.py

CLASSIFICATION_TRY_LEARNING_RATES = (0.01,)
"""The learning rates a classification run tries besides its own unless told otherwise
(TrainConfig.try_learning_rates): on the topic-shift benchmark the default's 0.005 held up
on two data sets and 0.01 on the third, and validation picked the better (docs/quality.md)."""
ValidationSplit = Literal["random", "topics"]
VALIDATION_SPLITS: tuple[str, ...] = get_args(ValidationSplit)


def _nested(cls: type, value: Any, section: str, problems: list[str]) -> Any:
    """`value` as a `cls` (built from a dict when it is one), or None with its problems added.

    Unknown keys are a problem of their own, named, rather than a TypeError from the dataclass.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        problems.append(f"{section} must be a {cls.__name__} or a dict, got {type(value).__name__}")
        return None
    unknown = sorted(set(value) - {f.name for f in fields(cls)})
    if unknown:
        problems.append(f"unknown {section} settings: {', '.join(unknown)}")
        return None
    try:
        return cls(**value)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


@dataclass
class RunConfig:
    """One training run."""

    train_csv: str
    text_column: str | None = None
    """The CSV column holding the text; unset (None), it is guessed from names and content."""
    label_column: str | None = None
    """The CSV column holding the label; unset (None), it is guessed."""
    target_column: str | None = None
    """A column of texts to generate from text_column: makes this a generation run (loss on
    the target's tokens, scored by BLEU and related metrics); label_column is then unused."""
    validation_csv: str | None = None
    """Held-out data; without it a stratified share of train_csv is held out."""
    validation_share: float = 0.2
    """The share of train_csv held out when there is no validation_csv."""
    validation_split: ValidationSplit = "random"
    """How that share is drawn: random (stratified by label), or topics: whole clusters of
    similar texts (data/topics.py), so the step kept and the decision fitted are those that
    do best on topics training never read, as a test set from other topics would ask."""
    shift_csv: str | None = None
    """A labeled CSV from other topics or sources than train_csv (same columns and labels):
    the final report scores the kept prefix on it beside validation, and warns when the two
    differ by more than 0.10 (runs/scoring.SHIFT_GAP). It chooses nothing."""
    max_train_examples: int | None = None
    """A stratified, seeded sample of the training rows, to bound an epoch's time."""
    max_eval_examples: int | None = 500
    """Held-out rows scored per evaluation: each costs one forward pass per label set. In a
    generation run: the distinct inputs held out (with all their references)."""
    model: str = DEFAULT_MODEL
    """A local folder or hub id of the frozen base model; the default is embedded."""
    template: str = DEFAULT_TEMPLATE
    """The prompt, with {text} (required) and {labels} (optional: the label names)."""
    max_length: int = 128
    """Tokens per prompt + label; longer texts are cut (and counted in a warning)."""
    task: str | None = None
    """A short task description; with the label names it makes the default init text."""
    device: str | None = None
    """cpu, cuda, cuda:1 ...; unset (None) picks CUDA when present, else CPU."""
    precision: PrecisionName = "auto"
    """The frozen model's compute dtype: auto, float32, bfloat16 or float16 (CUDA only);
    precision.py. auto is bfloat16 where the processor multiplies it natively, else float32.
    A new run's config.json holds the precision auto chose, so the run resumes in its own.
    The prefix, its optimizer and the loss stay float32 whatever this says."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for repositories you trust)."""
    nproc: int | None = None
    """Data-parallel processes, started through torch's launcher (gloo on CPU, one GPU each on
    CUDA; distributed.py); unset: every CUDA device, or one process on CPU, where a second
    pays only while cores sit idle. The trained prefix does not depend on it."""
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    generation: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding for a generation run's reports and predictions; max_new_tokens also caps the
    target tokens trained on."""
    eval_generate_inputs: int = 24
    """Generation runs: held-out inputs generated (greedy) at each evaluation for a live BLEU;
    the final report generates every held-out input with `generation`'s settings."""
    decision: Decision = "fitted"
    """How label scores become a decision, in validation, reports and predictions: prior
    subtracts the log of each label's training frequency first (a prefix trained on skewed
    labels learns the skew, and would otherwise rarely pick a rare label); fitted subtracts
    the share of it that decides best on the validation rows, chosen when training ends
    (balance.fit_prior_scale); raw takes the label the prefixed model finds likeliest."""
    label_scores: LabelScores = "sum"
    """How a label of several tokens is scored: sum (its total log probability) or mean (per token,
    so long label names are not penalized for their length)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        self.prefix = _nested(PrefixConfig, self.prefix, "prefix", problems)
        self.training = _nested(TrainConfig, self.training, "training", problems)
        self.generation = _nested(DecodeConfig, self.generation, "generation", problems)
        if self.target_column is not None and self.template == DEFAULT_TEMPLATE:
            # The classification prompt ("Category (labels):") means nothing without labels.
            self.template = DEFAULT_GENERATION_TEMPLATE
        if (self.target_column is not None and self.training is not None
                and self.training.monitor in ("macro_f1", "accuracy")):
            # A generation run has no labels: its validation loss picks the step to keep.
            self.training.monitor = "val_loss"
        if self.training is not None and self.training.try_learning_rates is None:
            # measured on classification only (docs/quality.md): a generation run trains once
            self.training.try_learning_rates = (
                () if self.target_column is not None else CLASSIFICATION_TRY_LEARNING_RATES)
        if self.decision not in DECISIONS:
            problems.append(f"decision must be one of {', '.join(DECISIONS)}, "
                            f"got {self.decision!r}")
        if self.label_scores not in LABEL_SCORES:
            problems.append(f"label_scores must be one of {', '.join(LABEL_SCORES)}, "
                            f"got {self.label_scores!r}")
        problems.extend(check_precision(self.precision))
        if self.eval_generate_inputs < 0:
            problems.append(f"eval_generate_inputs must be 0 or more, got "
                            f"{self.eval_generate_inputs}")
        if self.shift_csv and self.target_column is not None:
            problems.append("shift_csv scores labels: a generation run (target_column) has "
                            "none; leave shift_csv unset")
        if self.validation_split not in VALIDATION_SPLITS:
            problems.append(f"validation_split must be one of {', '.join(VALIDATION_SPLITS)}, "
                            f"got {self.validation_split!r}")
        if not 0.0 < self.validation_share < 0.9:
            problems.append(f"validation_share must be in (0, 0.9), got {self.validation_share}")
        if self.nproc is not None and not 1 <= self.nproc <= MAX_PROCESSES:
            problems.append(f"nproc must be 1..{MAX_PROCESSES} or unset, got {self.nproc}")
        if not 16 <= self.max_length <= 8192:
            problems.append(f"max_length must be 16..8192, got {self.max_length}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                problems.append(f"{name} must be at least 2 or unset, got {value}")
        try:
            Template(self.template)
        except ConfigError as e:  # a TemplateError
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)

    @property
    def is_generation(self) -> bool:
        return self.target_column is not None

    def label_encoder(self, tokenizer, labels: Sequence[str],
                      label_counts: Mapping[str, int] | None = None,
                      prior_scale: float | None = None) -> Encoder:
        """The classification encoder with this run's decision rule; `label_counts` are the
        training rows per label (config.json's data.label_counts), which prior correction
        needs (without them the decision is raw); `prior_scale` the strength a "fitted"
        decision chose on the validation rows (data.prior_scale; unset: full correction)."""
        encoder = Encoder(tokenizer, Template(self.template), labels, self.max_length)
        encoder.rule = label_rule(self.decision, self.label_scores, encoder.labels,
                                  encoder.label_ids, label_counts, prior_scale)
        return encoder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown settings in config: {', '.join(unknown)}")
        # run folders written before decision rules existed decided on raw scores: keep that
        # and in float32, the only precision there was
        data = {"decision": "raw", "precision": "float32", **data}
        if isinstance(data.get("training"), dict):  # and before smoothing: the best evaluation
            # and before fitted schedules: the schedule over every epoch, cut by the budget
            # and before trying learning rates: the one rate
            data["training"] = {"smoothing": 0, "fit_schedule": False, "try_learning_rates": [],
                                **data["training"]}
        try:
            return cls(**data)
        except TypeError as e:  # e.g. a number given as text
            raise ConfigError(f"config does not fit RunConfig: {e}") from e
