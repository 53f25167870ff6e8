"""What both speed-benchmark contenders share: the settings (`BenchConfig`, passed to each worker
as JSON), the fixed stratified sample, and the `Task` built from it the same way in every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixlab.bench.machine import default_data_dir
from prefixlab.data.labeled import LabeledData
from prefixlab.data.splits import stratified_split
from prefixlab.engine.encode import DEFAULT_TEMPLATE, Encoder, Example, Template
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.precision import check_precision
from prefixlab.engine.prefix import default_init_text, text_key_values
from prefixlab.engine.train import TrainConfig
from prefixlab.errors import ConfigError

DEFAULT_CSV = "davidson_hate_offensive.csv"
CONTENDERS = ("ours", "peft")
VARIANTS = {
    "full": "PrefixLab as shipped",
    "generic": "without the lean Llama step (autograd through the model's own modules)",
    "unbucketed": "without length bucketing (random batches, as PEFT's loader forms them)",
}


@dataclass
class BenchConfig:
    """What both contenders share. Passed to each worker as JSON."""

    data_dir: str = str(default_data_dir())
    """Folder holding the reference CSVs (`PREFIXLAB_SHARED_DATA`)."""
    csv: str = DEFAULT_CSV
    rows: int = 256
    """Training rows: a few hundred, natural lengths, stratified by label."""
    eval_rows: int = 300
    """Held-out rows, scored by both contenders, disjoint from the training rows."""
    epochs: int = 2
    batch_size: int = 8
    prefix_length: int = 10
    max_length: int = 128
    learning_rate: float = 5e-3
    """PrefixLab's default; prefixes tolerate far larger steps than full weights."""
    warmup_steps: int = 10
    score_batch_size: int = 16
    """Texts per scoring batch (PEFT scores text x label rows, this many rows per batch)."""
    gen_rows: int = 16
    """Held-out prompts ours continues greedily after scoring, in one batch, for generation
    tokens/s (0: none). PEFT does not generate here (bench.generation compares generators)."""
    gen_tokens: int = 32
    """Tokens generated per prompt: EOS does not end a row, so every precision and run does
    the same work."""
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    """Seed of the data sample and of the first repeat's training (batch order)."""
    repeats: int = 1
    """Worker runs per contender, interleaved ours, peft, peft, ours, ...; medians reported.
    Repeat r trains with seed + r on the same sample, so F1 medians are over batch orders."""
    repeat: int = 0
    """Which repeat a worker runs (set by run_bench)."""
    variant: str = "full"
    """For `ours`: "full", or one PrefixLab speed-up switched off (VARIANTS), to show what
    each one buys."""
    model: str | None = None
    """None: the embedded default SmolLM2-135M (prefixlab.engine.models.load_model())."""
    device: str = "cpu"
    """Where both contenders train and score: "cpu" (what the targets are set for) or "cuda"."""
    precision: str = "auto"
    """Ours' compute dtype (prefixlab.engine.precision); PEFT loads float32, and runs under
    bf16 autocast on CUDA."""
    threads: int | None = None
    """Pin both contenders to this many CPU threads (OMP_NUM_THREADS, which also switches
    off train()'s thread tuner); None leaves torch's default, and ours its tuner."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("rows", "eval_rows", "epochs", "batch_size", "prefix_length",
                     "score_batch_size", "repeats"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        problems.extend(check_precision(self.precision))
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.gen_rows < 0:
            problems.append(f"gen_rows must be at least 0, got {self.gen_rows}")
        if not 1 <= self.gen_tokens <= 4096:
            problems.append(f"gen_tokens must be 1..4096, got {self.gen_tokens}")
        if self.rows + self.eval_rows < 6:
            problems.append("rows + eval_rows must be at least 6 for a stratified sample")
        if problems:
            raise ConfigError(problems)

    def train_config(self) -> TrainConfig:
        return TrainConfig(learning_rate=self.learning_rate, epochs=self.epochs,
                           batch_size=self.batch_size, warmup_steps=self.warmup_steps,
                           checkpoint_every=0, seed=self.train_seed)

    @property
    def train_seed(self) -> int:
        return self.seed + self.repeat


def sample_split(
    data: LabeledData, rows: int, eval_rows: int, seed: int
) -> tuple[LabeledData, LabeledData]:
    """A fixed stratified sample of rows + eval_rows examples, split into (train, held-out)."""
    wanted = rows + eval_rows
    if wanted < len(data):
        _, data = stratified_split(data, wanted / len(data), seed)
    train_part, held_out = stratified_split(data, eval_rows / len(data), seed)
    return train_part, held_out


@dataclass
class Task:
    """What both contenders train and score on, built the same way in every worker."""

    encoder: Encoder
    train: LabeledData
    held_out: LabeledData
    examples: list[Example]
    init_kv: torch.Tensor  # (L, 2, H_kv, P, D): the text initialization both start from


def build_task(loaded: LoadedModel, cfg: BenchConfig, data: LabeledData) -> Task:
    train_part, held_out = sample_split(data, cfg.rows, cfg.eval_rows, cfg.seed)
    encoder = Encoder(loaded.tokenizer, Template(cfg.template), data.label_names, cfg.max_length)
    examples = encoder.examples(train_part.texts, train_part.labels)
    init_kv = text_key_values(loaded.model, loaded.tokenizer, default_init_text(encoder.labels),
                              cfg.prefix_length)
    return Task(encoder, train_part, held_out, examples, init_kv)
