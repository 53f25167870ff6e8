"""The training loop: a plain loop over length-bucketed batches that reports through callbacks.

It knows nothing about files, databases or a UI. The caller listens through `on_step`,
`evaluate` and `on_checkpoint`, and stops it through `should_stop`. Batch order is a pure
function of (seed, epoch), and the learning rate a pure function of the step, so a run resumed
from a checkpoint continues exactly where it stopped.

Speed and memory on CPU (`python -m prefixlab.bench.speed`): a batch is read in chunks of
at most CHUNK_TOKENS padded tokens (CUDA_CHUNK_TOKENS on a GPU), a model whose family has a
fast step takes it (the lean Llama step in llama_cpu.py: same loss and gradient as batch_loss,
tested), and ThreadTuner (cpu.py) picks the CPU thread count from what each step measures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.engine import distributed
from prefixlab.engine.balance import class_weights, epoch_order
from prefixlab.engine.cpu import ThreadTuner, trim_heap
from prefixlab.engine.encode import Example, bucketed_batches, collate, target_mass, weighted_mean
from prefixlab.engine.families import TrainingLoss, family_of
from prefixlab.engine.prefix import Prefix, forward
from prefixlab.engine.schedule import Schedule
from prefixlab.engine.train_config import TrainConfig
from prefixlab.errors import PrefixLabError

if TYPE_CHECKING:
    from prefixlab.engine.methods import Trainable

CHUNK_TOKENS = 384
"""Most padded tokens one forward/backward holds on CPU. A bigger batch is read in chunks whose
gradients add up to the batch's, so activation memory stays bounded for any max_length.
Larger chunks run matmuls closer to their peak but raise peak memory for little speed
(measured in docs/benchmarks.md)."""

CUDA_CHUNK_TOKENS = 16384
"""The same on CUDA, where memory is plentiful and a step of a small model is bound by kernel
launches, which each chunk repeats: small chunks there cost speed, not memory. The most a
chunk takes: `cuda_chunk_tokens` lowers it to what the GPU's free memory holds."""


def cuda_chunk_tokens(config, free_bytes: int, element_bytes: int = 4) -> int:
    """Padded tokens per chunk on a GPU with `free_bytes` free: half of it over an estimate of
    one token's training activations (every layer's attention and MLP inputs kept for the
    backward pass, and the logits' row), at most CUDA_CHUNK_TOKENS, at least 256."""
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = (config.num_hidden_layers * (12 * hidden + 3 * inner) * element_bytes
                 + 2 * config.vocab_size * 4)
    return max(256, min(CUDA_CHUNK_TOKENS, free_bytes // 2 // per_token))


class TrainingOutOfMemory(PrefixLabError, MemoryError):
    """A training step ran out of memory (torch.OutOfMemoryError on a GPU, MemoryError on the
    CPU). The message says what to lower; `step`, the last complete step, was checkpointed,
    so the run resumes from it once a setting is lowered."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def out_of_memory_advice(device: torch.device, step: int, rows: Sequence[Example],
                         batch_size: int) -> str:
    """What to lower after step `step` + 1 ran out of memory on a batch of `rows`."""
    longest = max((len(e) for e in rows), default=0)
    return (f"out of memory on {device} in training step {step + 1} (a batch of {len(rows)} "
            f"rows, the longest {longest} tokens): lower the batch size (now {batch_size}) or "
            "the max length, or use a model held in a smaller dtype; the run was saved at "
            f"step {step} and resumes from there")


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
    elapsed_s: float = 0.0  # training time so far, for the time budget across resumes
    planned_steps: int = 0  # the schedule's length fitted to the time budget; 0: not yet

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"prefix.{k}": v for k, v in self.prefix_state.items()}
        out.update({f"optimizer.{k}": v for k, v in self.optimizer_state.items()})
        return out

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, torch.Tensor],
                     elapsed_s: float = 0.0, planned_steps: int = 0) -> Checkpoint:
        prefix = {k[7:]: v for k, v in tensors.items() if k.startswith("prefix.")}
        opt = {k[10:]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        return cls(step, prefix, opt, elapsed_s, planned_steps)


@dataclass
class TrainResult:
    steps: int
    stopped: bool  # should_stop asked to end early
    last_loss: float | None
    reason: str = ""  # why training ended, in words (budget, patience, time, cancelled)
    elapsed_s: float = 0.0  # training time, resumes included: what the time budget has used


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
    warmup = cfg.warmup(total)
    if warmup and step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    span = max(1, total - warmup)
    return cfg.learning_rate * max(0.0, 1 - (step - warmup) / span)


def kept_slots(length: int, share: float, seed: int, step: int) -> torch.Tensor:
    """The prefix slots training step `step` (0-based) reads under a prefix dropout of
    `share` (TrainConfig.prefix_dropout): (P,) bool, true to keep. A pure function of its
    arguments, so a resumed run and every data-parallel rank draw the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(length, generator=generator) >= share  # (P,)


def batch_loss(model: nn.Module, kv: torch.Tensor | None, batch,
               prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (or weighted mean) cross-entropy over the label tokens; logits only where the loss
    reads them. `prefix_mask`: the prefix slots read, (P,) bool (`kept_slots`); None, all."""
    logits = forward(model, kv, batch.input_ids, batch.attention_mask, batch.loss_mask,
                     prefix_mask)
    if batch.weights is None:
        return F.cross_entropy(logits.float(), batch.targets)  # logits: (n_target_tokens, V)
    return weighted_mean(F.cross_entropy(logits.float(), batch.targets, reduction="none"),
                         batch.weights)


def _chunks(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """Rows in length order, cut into chunks of at most `max_tokens` padded tokens each
    (a row longer than that is a chunk of its own). Balanced: as few chunks as the budget
    allows, of similar size."""
    rows = sorted(examples, key=len)
    padded = len(rows) * len(rows[-1])
    count = max(1, -(-padded // max_tokens))
    while True:
        size = -(-len(rows) // count)  # rows per chunk
        parts = [rows[i : i + size] for i in range(0, len(rows), size)]
        if size == 1 or all(len(p) * len(p[-1]) <= max_tokens for p in parts):
            return parts
        count += 1


def _backward(
    model: nn.Module, kv: torch.Tensor | None, examples: Sequence[Example], pad_id: int,
    device: torch.device, max_tokens: int, fast_loss: TrainingLoss | None = None,
    n_targets: float | None = None, prefix_mask: torch.Tensor | None = None,
) -> tuple[float, int, int]:
    """The batch's mean loss, its gradient accumulated through `kv`.

    Returns (loss, non-padding tokens, padded tokens).

    The batch is read in chunks of at most `max_tokens` padded tokens, so activation memory
    is bounded whatever the rows' lengths. Each chunk's mean is weighted by its share of the
    batch's label tokens (of their summed loss weights, when weighted): the sum is the whole
    batch's mean loss, and so is the gradient.
    `prefix_mask`: the prefix slots every chunk reads (prefix dropout); only without
    `fast_loss`, which reads them all.
    `fast_loss`: the model family's fast step (e.g. the lean Llama step on CPU), or None for
    autograd through the model's own modules (`batch_loss`).
    `n_targets`: the label tokens (`target_mass`) of the whole batch when `examples` are one
    rank's share of it (distributed.share), so the ranks' losses and gradients add up to the
    batch's.
    """
    if not examples:  # an empty share of a small batch: no loss, no gradient
        return 0.0, 0, 0
    dtype = next(model.parameters()).dtype
    # The model reads the prefix in its compute dtype: cast once per step, not per chunk or
    # layer. Each chunk's gradient is added into `grad` in float32, the master weights' dtype.
    # kv None: nothing in front of the rows, the trained weights are the model's (methods.py).
    leaf, grad = kv, None
    if kv is not None and not (kv.is_leaf and kv.dtype == dtype):
        leaf = kv.detach().to(dtype).requires_grad_()
        grad = torch.zeros_like(kv, dtype=torch.float32)
    n_targets = n_targets or target_mass(examples)
    total, real, padded = 0.0, 0, 0
    for chunk in _chunks(examples, max_tokens):
        batch = collate(chunk, pad_id).to(device)
        with _attention_backends(device):
            loss = (fast_loss(model, leaf, batch) if fast_loss is not None
                    else batch_loss(model, leaf, batch, prefix_mask))
            loss = loss * (batch.mass / n_targets)
        loss.backward()
        if grad is not None and leaf.grad is not None:
            grad += leaf.grad
            leaf.grad = None
        if fast_loss is not None:
            fast_loss.release()
        total += float(loss.detach())
        real += batch.real_tokens
        padded += batch.input_ids.numel()
    if grad is not None and kv is not None:  # e.g. through the reparameterization MLP or
        kv.backward(grad.to(kv.dtype))  # a prompt read by the model, once per batch
    return total, real, padded


def _attention_backends(device: torch.device):
    """On CUDA, SDPA without cuDNN's kernels: cuDNN builds a plan for each new sequence length,
    and length-bucketed batches bring many, so a first epoch would mostly build plans."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _epoch_batches(examples: Sequence[Example], labels: Sequence[int], cfg: TrainConfig,
                   epoch: int, batch_order: Callable[[Sequence[int], int, int, int],
                                                     list[list[int]]]) -> list[list[Example]]:
    """The epoch's batches of examples: its class-balanced order, cut by `batch_order`."""
    order = epoch_order(labels, cfg.class_balance, cfg.seed, epoch)
    batches = batch_order([len(examples[i]) for i in order], cfg.batch_size, cfg.seed, epoch)
    return [[examples[order[i]] for i in b] for b in batches]


def train(
    model: nn.Module,
    prefix: Prefix | Trainable,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_id: int,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[int], str | None] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
    fast_path: bool = True,
    batch_order: Callable[[Sequence[int], int, int, int], list[list[int]]] = bucketed_batches,
    reserve_s: Callable[[], float] | None = None,
    anchor: Sequence[torch.Tensor] | None = None,
) -> TrainResult:
    """Train `prefix` on `examples` with `model` frozen.

    `prefix` may be another method's trainable part (methods.Trainable: a prompt, LoRA or
    full weights), which trains through the same batches, schedule and callbacks; pass
    `fast_path=False` for one that changes the model's own weights.

    `evaluate(step)` runs every `cfg.evaluation_interval` steps, at the end of each epoch
    and when the time budget runs out; it returns a reason to end training (e.g. patience
    ran out) or None to go on. `on_checkpoint` gets a checkpoint every `checkpoint_every`
    steps and at the end. `reserve_s()`: seconds of the time budget to leave for what follows
    training (the run's final report), asked at each check of the budget.
    `fast_path=False` trains without the model family's fast step (same loss and gradient,
    through autograd), and `batch_order(lengths, batch_size, seed, epoch)` replaces length
    bucketing: the benchmark's ablations, each showing what one speed-up buys. A run with
    `cfg.prefix_dropout` above 0 trains without the fast step too: the lean Llama step
    (llama_cpu.py) reads every prefix slot, and the dropout masks some out (batch_loss).

    In a process group (torchrun, see distributed.py) every rank calls this with the same
    arguments: each reads its share of every batch, gradients are summed across ranks, and
    the callbacks run on every rank (rank 0 alone should write).
    `anchor`: the trainable parameters' start, which `cfg.start_pull` pulls toward; by
    default their values when train is called, before a resumed checkpoint is loaded.
    """
    device = next(model.parameters()).device
    prefix.to(device)
    params = [p for p in prefix.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    pull_to = None
    if cfg.start_pull:
        pull_to = [a.detach().to(device).clone() for a in (anchor or params)]
    start, before, planned = 0, 0.0, 0
    if resume is not None:
        prefix.load_state_dict({k: v.to(device) for k, v in resume.prefix_state.items()})
        if resume.optimizer_state:
            _load_optimizer(optimizer, resume.optimizer_state)
        start, before, planned = resume.step, resume.elapsed_s, resume.planned_steps
    distributed.broadcast_parameters(prefix)
    should_stop = distributed.agreed(should_stop)  # all ranks stop at the same step

    labels = [e.label for e in examples]
    if cfg.class_balance == "weighted":
        weights = class_weights(labels, max(labels) + 1)
        examples = [replace(e, weight=weights[e.label]) for e in examples]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.total_steps(len(examples))
    interval = cfg.evaluation_interval(per_epoch)
    schedule = Schedule(cfg.max_minutes * 60, cfg.fit_schedule, total, start, before, planned,
                        reserve_s)

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            state = {k: v.detach().cpu().clone() for k, v in prefix.state_dict().items()}
            on_checkpoint(Checkpoint(step, state, _optimizer_tensors(optimizer),
                                     before + schedule.elapsed(), schedule.planned))

    seen = tokens = 0
    loss_value = None
    step = start

    def ended(why: str, stopped: bool = False) -> TrainResult:
        """Checkpoint the step training ends on, and say why it ended."""
        checkpoint(step)
        return TrainResult(step, stopped, loss_value, why, before + schedule.elapsed())

    epoch_batches: dict[int, list[list[Example]]] = {}
    tuner = ThreadTuner(device)
    dropout = cfg.prefix_dropout
    fast_loss = (family_of(model.config).fast_training_loss(model)
                 if fast_path and not dropout else None)
    chunk_tokens = (cuda_chunk_tokens(model.config, torch.cuda.mem_get_info(device)[0],
                                      next(model.parameters()).element_size())
                    if device.type == "cuda" else CHUNK_TOKENS)
    time_reason = f"time budget of {cfg.max_minutes:g} min"
    reason = (f"budget of {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
              if cfg.max_steps is None or total < cfg.max_steps
              else f"budget of {cfg.max_steps} steps")
    try:
        while step < schedule.end:
            if should_stop is not None and should_stop():
                return ended("cancelled", stopped=True)
            epoch, index = divmod(step, per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: _epoch_batches(examples, labels, cfg, epoch, batch_order)}
            rows = epoch_batches[epoch][index]

            lr = learning_rate_at(step, schedule.end, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            tuner.start()
            try:  # forward and backward: the prefix and the optimizer are still step's
                kv = prefix.key_values()  # a prompt's reads the model: inside, for its memory
                keep = kept_slots(kv.shape[3], dropout, cfg.seed, step) if (
                    dropout and kv is not None) else None  # (P,); kv None: no slots to hide
                loss_value, real, padded = _backward(
                    model, kv, distributed.share(rows), pad_id, device, chunk_tokens,
                    fast_loss, target_mass(rows), keep)  # the whole batch's
            except (torch.OutOfMemoryError, MemoryError) as e:
                optimizer.zero_grad(set_to_none=True)  # the partial gradients' memory
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                checkpoint(step)
                raise TrainingOutOfMemory(
                    out_of_memory_advice(device, step, rows, cfg.batch_size), step) from e
            loss_value, real = distributed.reduce_step(params, loss_value, real)
            if pull_to is not None:  # after the ranks' sum: every rank adds the pull once
                for p, a in zip(params, pull_to, strict=True):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - a, alpha=cfg.start_pull)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            tuner.stop(padded)
            if device.type == "cpu":
                trim_heap()

            step += 1
            schedule.after_step(step)
            end = schedule.end
            seen += len(rows)
            tokens += int(real)
            elapsed = schedule.elapsed()
            if on_step is not None:
                on_step(StepInfo(
                    step=step, total_steps=end, epoch=step / per_epoch, loss=loss_value,
                    learning_rate=lr, examples_per_s=seen / elapsed if elapsed else 0.0,
                    tokens_per_s=tokens / elapsed if elapsed else 0.0, elapsed_s=elapsed,
                    eta_s=schedule.eta(step),
                ))
            out_of_time = schedule.out_of_time(step)
            end_of_epoch = step % per_epoch == 0 or step == end
            # counted within the epoch: when the interval does not divide the epoch,
            # `step % interval` would also evaluate a step or two before its end
            in_epoch = step % per_epoch or per_epoch
            if evaluate is not None and (end_of_epoch or in_epoch % interval == 0 or out_of_time):
                verdict = evaluate(step)
                if verdict:
                    return ended(verdict)
                schedule.after_evaluation(step, out_of_time)
            if out_of_time:
                return ended(time_reason)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != end:
                checkpoint(step)
        return ended(time_reason if step < total else reason)
    finally:
        tuner.close()
        if fast_loss is not None:
            fast_loss.close()
