"""The training loop: a plain loop over length-bucketed batches that reports through callbacks.

It knows nothing about files, databases or a UI. The caller listens through `on_step`,
`evaluate` and `on_checkpoint`, and stops it through `should_stop`. Batch order is a pure
function of (seed, epoch), and the learning rate a pure function of the step, so a run resumed
from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.encode import Example, bucketed_batches, collate
from prefixlab.models import autocast
from prefixlab.prefix import Prefix, forward


@dataclass
class TrainConfig:
    """Optimization settings. Stored in every run's config.json."""

    learning_rate: float = 5e-3
    """AdamW step size for the prefix; prefixes tolerate far larger steps than full weights."""
    epochs: int = 1
    batch_size: int = 8
    max_steps: int | None = None
    """Stop after this many steps (0 saves the initialized prefix); None runs all epochs."""
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0
    """Evaluate every N steps; 0 evaluates at the end of each epoch only."""
    checkpoint_every: int = 25
    """Checkpoint (prefix + optimizer) every N steps, so a crash loses at most that much."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.learning_rate < 10:
            problems.append(f"learning_rate must be in (0, 10), got {self.learning_rate}")
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if not 1 <= self.batch_size <= 1024:
            problems.append(f"batch_size must be 1..1024, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"max_steps must be 0 or more, got {self.max_steps}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))

    def total_steps(self, num_examples: int) -> int:
        per_epoch = math.ceil(num_examples / self.batch_size)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(self.max_steps, total)


@dataclass
class StepInfo:
    """What one optimizer step reports."""

    step: int  # 1-based, steps done so far
    total_steps: int
    epoch: float  # fractional epochs done
    loss: float
    learning_rate: float
    examples_per_s: float
    tokens_per_s: float  # non-padding tokens
    elapsed_s: float
    eta_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    """Everything needed to continue: the prefix parameters, AdamW's moments, the step."""

    step: int
    prefix_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"prefix.{k}": v for k, v in self.prefix_state.items()}
        out.update({f"optimizer.{k}": v for k, v in self.optimizer_state.items()})
        return out

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        prefix = {k[7:]: v for k, v in tensors.items() if k.startswith("prefix.")}
        opt = {k[10:]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        return cls(step, prefix, opt)


@dataclass
class TrainResult:
    steps: int
    stopped: bool  # should_stop asked to end early
    last_loss: float | None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"{idx}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return flat


def _load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def learning_rate_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then linear decay to zero (Li & Liang's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    return cfg.learning_rate * max(0.0, 1 - (step - cfg.warmup_steps) / span)


def batch_loss(model: nn.Module, kv: torch.Tensor, batch) -> torch.Tensor:
    """Mean cross-entropy over the label tokens; logits only where the loss reads them."""
    logits = forward(model, kv, batch.input_ids, batch.attention_mask, batch.loss_mask)
    return F.cross_entropy(logits.float(), batch.targets)  # logits: (n_target_tokens, V)


def train(
    model: nn.Module,
    prefix: Prefix,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_id: int,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train `prefix` on `examples` with `model` frozen.

    `evaluate(step)` runs at every `eval_every` steps and at the end of each epoch;
    `on_checkpoint` gets a checkpoint every `checkpoint_every` steps and at the end.
    """
    device = next(model.parameters()).device
    prefix.to(device)
    params = [p for p in prefix.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        prefix.load_state_dict({k: v.to(device) for k, v in resume.prefix_state.items()})
        if resume.optimizer_state:
            _load_optimizer(optimizer, resume.optimizer_state)
        start = resume.step

    lengths = [len(e) for e in examples]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.total_steps(len(examples))

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            state = {k: v.detach().cpu().clone() for k, v in prefix.state_dict().items()}
            on_checkpoint(Checkpoint(step, state, _optimizer_tensors(optimizer)))

    began = time.perf_counter()
    seen = tokens = 0
    loss_value = None
    step = start
    epoch_batches: dict[int, list[list[int]]] = {}
    while step < total:
        if should_stop is not None and should_stop():
            checkpoint(step)
            return TrainResult(step, True, loss_value)
        epoch, index = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)}
        batch = collate([examples[i] for i in epoch_batches[epoch][index]], pad_id).to(device)

        lr = learning_rate_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            loss = batch_loss(model, prefix.key_values(), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

        step += 1
        loss_value = float(loss.detach())
        seen += batch.input_ids.shape[0]
        tokens += batch.real_tokens
        elapsed = time.perf_counter() - began
        if on_step is not None:
            rate = (step - start) / elapsed if elapsed > 0 else 0.0
            on_step(StepInfo(
                step=step, total_steps=total, epoch=step / per_epoch, loss=loss_value,
                learning_rate=lr, examples_per_s=seen / elapsed if elapsed else 0.0,
                tokens_per_s=tokens / elapsed if elapsed else 0.0, elapsed_s=elapsed,
                eta_s=(total - step) / rate if rate else 0.0,
            ))
        end_of_epoch = step % per_epoch == 0 or step == total
        if evaluate is not None and (
            end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0)
        ):
            evaluate(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total:
            checkpoint(step)
    checkpoint(step)
    return TrainResult(step, False, loss_value)
