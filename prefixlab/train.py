"""The training loop: a plain loop over length-bucketed batches that reports through callbacks.

It knows nothing about files, databases or a UI. The caller listens through `on_step`,
`evaluate` and `on_checkpoint`, and stops it through `should_stop`. Batch order is a pure
function of (seed, epoch), and the learning rate a pure function of the step, so a run resumed
from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.encode import Example, bucketed_batches, collate
from prefixlab.models import autocast
from prefixlab.prefix import Prefix, forward

CHUNK_TOKENS = 256
"""Most padded tokens one forward/backward holds. A bigger batch is read in chunks whose
gradients add up to the batch's, so activation memory stays bounded (~1 MB per token for
SmolLM2-135M in float32) for any max_length; chunks of a few hundred rows keep CPU matmuls
near their peak."""


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


# --- a lean training forward for Llama-family decoders on CPU --------------------------------
#
# The loss of batch_loss, computed from the model's own modules with less work and memory:
# - attention runs on the key/value heads (SDPA enable_gqa), not on copies repeated per query
#   head, under one (T, P+T) mask: prefix, then causal. With right padding, real positions
#   never see padding, so the padding mask is not needed for the positions the loss reads;
# - RMSNorm, RoPE and SwiGLU are single autograd nodes that keep only what their backward needs
#   (SwiGLU keeps gate and up, not silu(gate)): ~0.7 MB of saved activations per token for
#   SmolLM2-135M instead of ~1 MB, and a third of the operator calls;
# - the last layer's output projection and MLP run only at the positions the loss reads.
# Frozen weights need no gradient, so no linear layer keeps its input for the backward.


class _RMSNorm(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps), with w frozen; keeps x and 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, rstd)
        ctx.weight = weight
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd = ctx.saved_tensors
        gw = grad * ctx.weight
        dot = (gw * x).mean(-1, keepdim=True)  # (..., 1)
        return rstd * (gw - x * (rstd * rstd * dot)), None, None


class _Rope(torch.autograd.Function):
    """Rotary embedding x*cos + rotate_half(x)*sin; cos and sin are constants, nothing is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.cos, ctx.sin = cos, sin
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # rotate_half is a rotation by 90 degrees: its transpose is -rotate_half
        return grad * ctx.cos - _rotate_half(grad * ctx.sin), None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; keeps gate and up, recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


_BETWEEN = None
_LEAN_TYPES = {"llama"}  # model families whose decoder the lean forward reproduces exactly


def _lean_supported(model: nn.Module) -> bool:
    """Whether `_lean_loss` computes exactly what batch_loss computes for this model."""
    config = model.config
    if config.model_type not in _LEAN_TYPES or getattr(config, "hidden_act", None) != "silu":
        return False
    if next(model.parameters()).device.type != "cpu" or model.training:
        return False
    if any(p.requires_grad or p.dtype != torch.float32 for p in model.parameters()):
        return False
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


def _lean_loss(model: nn.Module, kv: torch.Tensor, batch) -> torch.Tensor:
    """batch_loss for a right-padded batch on a supported model (see `_lean_supported`)."""
    inner = model.model
    B, T = batch.input_ids.shape
    P = kv.shape[3]
    h = inner.embed_tokens(batch.input_ids)  # (B, T, C)
    positions = torch.arange(P, P + T, device=h.device).unsqueeze(0)  # (1, T): after the prefix
    cos, sin = inner.rotary_emb(h, positions)  # (1, T, D) each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, T, D): broadcast over batch, heads
    mask = torch.ones(T, P + T, dtype=torch.bool, device=h.device).tril(P)  # (T, P+T)
    keep = batch.loss_mask  # (B, T) bool
    last = len(inner.layers) - 1
    for i, layer in enumerate(inner.layers):
        if _BETWEEN is not None:
            _BETWEEN(i)
        attn, mlp = layer.self_attn, layer.mlp
        D = attn.head_dim
        x = _RMSNorm.apply(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, -1, D).transpose(1, 2)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, -1, D).transpose(1, 2)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, -1, D).transpose(1, 2)
        q, k = _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)  # (B, H, T, D), (B, H_kv, T, D)
        k = torch.cat([kv[i, 0].expand(B, -1, -1, -1), k], dim=2)  # (B, H_kv, P+T, D)
        v = torch.cat([kv[i, 1].expand(B, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=True)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        if i == last:  # nothing after this layer reads the other positions
            o, h = o[keep], h[keep]  # (n, H*D), (n, C)
        h = h + F.linear(o, attn.o_proj.weight, attn.o_proj.bias)
        norm = layer.post_attention_layernorm
        x = _RMSNorm.apply(h, norm.weight, norm.variance_epsilon)
        g = _SwiGLU.apply(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias),
                          F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias))
        h = h + F.linear(g, mlp.down_proj.weight, mlp.down_proj.bias)
    h = _RMSNorm.apply(h, inner.norm.weight, inner.norm.variance_epsilon)  # (n, C)
    logits = model.get_output_embeddings()(h)  # (n, V)
    return F.cross_entropy(logits.float(), batch.targets)


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


class _SavedArena:
    """Keeps the activations autograd saves for the backward in a few large blocks of memory.

    A forward allocates two kinds of tensors: those kept for the backward, and short-lived
    ones freed a moment later. In one heap the freed ones leave holes between the kept ones
    that later requests do not fit, so the process holds ~1.8x the memory it uses (measured
    for SmolLM2-135M). Copied into these blocks (`pack`, as a saved-tensors hook), the kept
    tensors leave the heap to the short-lived ones, which reuse the same holes layer after
    layer. The blocks are reused chunk after chunk and released by `close`.
    """

    BLOCK = 64 << 20  # bytes; above glibc's largest mmap threshold, so never part of the heap
    SMALL = 64 << 10  # smaller tensors stay where they are

    def __init__(self, keep_in_place: Sequence[torch.Tensor]):
        self.blocks: list[torch.Tensor] = []
        self.block = self.offset = 0
        self.in_place = {t.untyped_storage().data_ptr() for t in keep_in_place}
        self.copied = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if (nbytes < self.SMALL or nbytes > self.BLOCK or t.device.type != "cpu"
                or not _dense(t)
                or t.untyped_storage().data_ptr() in self.in_place):
            return t
        start = -(-self.offset // 64) * 64  # 64-byte aligned
        if start + nbytes > self.BLOCK:
            self.block, start = self.block + 1, 0
        if self.block == len(self.blocks):
            self.blocks.append(torch.empty(self.BLOCK, dtype=torch.uint8))
        flat = self.blocks[self.block][start : start + nbytes].view(t.dtype)
        copy = flat.as_strided(t.shape, t.stride())  # the original's layout
        copy.copy_(t)
        self.offset = start + nbytes
        self.copied += 1
        return copy

    def reset(self) -> None:
        """Call once the backward is done and nothing refers to the copies any more."""
        self.block = self.offset = self.copied = 0

    def close(self) -> None:
        self.reset()
        self.blocks.clear()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` fills its memory without gaps, in some order of its dimensions."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).is_contiguous()


def _backward(
    model: nn.Module, kv: torch.Tensor, examples: Sequence[Example], pad_id: int,
    device: torch.device, max_tokens: int, arena: _SavedArena | None = None,
) -> tuple[float, int, int]:
    """The batch's mean loss, its gradient accumulated through `kv`.

    Returns (loss, non-padding tokens, padded tokens).

    The batch is read in chunks of at most `max_tokens` padded tokens, so activation memory
    is bounded whatever the rows' lengths. Each chunk's mean is weighted by its share of the
    batch's label tokens: the sum is the whole batch's mean loss, and so is the gradient.
    """
    leaf = kv if kv.is_leaf else kv.detach().requires_grad_()  # chunks add their grads here
    n_targets = sum(len(e.target) for e in examples)
    total, real, padded = 0.0, 0, 0
    loss_fn = _lean_loss if _lean_supported(model) else batch_loss
    for chunk in _chunks(examples, max_tokens):
        batch = collate(chunk, pad_id).to(device)
        if arena is None:
            with autocast(device):
                loss = loss_fn(model, leaf, batch) * (batch.targets.numel() / n_targets)
        else:
            with autocast(device), torch.autograd.graph.saved_tensors_hooks(arena.pack, _same):
                loss = loss_fn(model, leaf, batch) * (batch.targets.numel() / n_targets)
        loss.backward()
        if arena is not None:
            arena.reset()
        total += float(loss.detach())
        real += batch.real_tokens
        padded += batch.input_ids.numel()
    if leaf is not kv:  # e.g. through the reparameterization MLP, once per batch
        kv.backward(leaf.grad)
    return total, real, padded


class ThreadTuner:
    """Picks torch's CPU thread count step by step, from the speed each count measures.

    On cores that other processes also use, every parallel op waits at an OpenMP barrier for
    a thread the scheduler has not run yet: on 2 shared cores we measured a training step 6x
    slower with 2 threads than with 1. On idle cores, 2 threads are ~1.8x faster than 1. The
    tuner runs the count with the lower seconds per padded token, and tries the other one for
    a step now and then (sooner when the current count slows down past the other's last
    speed, rarer each time a try loses), so it follows the machine as it fills and empties.

    Inactive (a no-op) on CUDA, with one thread, or when OMP_NUM_THREADS pins the count.
    """

    def __init__(self, device: torch.device, first_probe: int = 4, max_interval: int = 32,
                 clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.initial = torch.get_num_threads()
        self.active = (device.type == "cpu" and self.initial > 1
                       and "OMP_NUM_THREADS" not in os.environ)
        self.counts = (self.initial, 1)
        self.current = self.initial
        self.cost: dict[int, float] = {}  # threads -> recent seconds per padded token
        self.first_probe = self.interval = first_probe
        self.max_interval = max_interval
        self.since_probe = 0
        self._trying: int | None = None
        self._began = 0.0

    def start(self) -> None:
        """Call before a step: sets the thread count it runs with."""
        if not self.active:
            return
        other = self.counts[1] if self.current == self.counts[0] else self.counts[0]
        due = self.since_probe >= self.interval or (
            other in self.cost and self.cost.get(self.current, 0.0) > self.cost[other])
        self._trying = other if due else None
        torch.set_num_threads(self._trying or self.current)
        self._began = self.clock()

    def stop(self, work: int) -> None:
        """Call after a step with its work (padded tokens)."""
        if not self.active or work <= 0:
            return
        cost = (self.clock() - self._began) / work
        n = self._trying or self.current
        old = self.cost.get(n)
        # Trials replace what is known of a count; the running count is smoothed over steps.
        self.cost[n] = cost if old is None or self._trying else 0.5 * old + 0.5 * cost
        if self._trying is None:
            self.since_probe += 1
            return
        self.since_probe = 0
        if self.cost[n] < self.cost.get(self.current, float("inf")):
            self.current, self.interval = n, self.first_probe
        else:
            self.interval = min(2 * self.interval, self.max_interval)

    def close(self) -> None:
        """Restore the thread count found at the start."""
        if self.active:
            torch.set_num_threads(self.initial)


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
    tuner = ThreadTuner(device)
    arena = (_SavedArena([*model.parameters(), *prefix.parameters()])
             if device.type == "cpu" else None)
    try:
        while step < total:
            if should_stop is not None and should_stop():
                checkpoint(step)
                return TrainResult(step, True, loss_value)
            epoch, index = divmod(step, per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)}
            rows = [examples[i] for i in epoch_batches[epoch][index]]

            lr = learning_rate_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            tuner.start()
            loss_value, real, padded = _backward(model, prefix.key_values(), rows, pad_id, device,
                                                 CHUNK_TOKENS, arena)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            tuner.stop(padded)

            step += 1
            seen += len(rows)
            tokens += real
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
    finally:
        tuner.close()
        if arena is not None:
            arena.close()
