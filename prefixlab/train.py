"""The training loop: a plain loop over length-bucketed batches that reports through callbacks.

It knows nothing about files, databases or a UI. The caller listens through `on_step`,
`evaluate` and `on_checkpoint`, and stops it through `should_stop`. Batch order is a pure
function of (seed, epoch), and the learning rate a pure function of the step, so a run resumed
from a checkpoint continues exactly where it stopped.

Speed and memory on CPU (measured by `python -m prefixlab.bench`): a batch is read in chunks of
at most CHUNK_TOKENS padded tokens (CUDA_CHUNK_TOKENS on a GPU), Llama-family models go through
a lean step with a hand-written backward (same loss and gradient as batch_loss, tested), and
ThreadTuner picks the CPU thread count from what each step measures.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.balance import epoch_order
from prefixlab.encode import Example, bucketed_batches, collate
from prefixlab.errors import ConfigError
from prefixlab.models import autocast
from prefixlab.prefix import Prefix, forward

CHUNK_TOKENS = 384
"""Most padded tokens one forward/backward holds on CPU. A bigger batch is read in chunks whose
gradients add up to the batch's, so activation memory stays bounded for any max_length:
~0.7 MB per token for SmolLM2-135M on the lean path, so training peaks at ~1.4 GB resident
with the model. Larger chunks run matmuls closer to their peak, but 512 gained only ~4% with
oneDNN's matmuls (`_linear`) and took the benchmark's peak RSS to ~1.53 GB."""
Monitor = Literal["macro_f1", "accuracy", "val_loss"]
ClassBalance = Literal["none", "sampled"]
MONITORS: tuple[str, ...] = get_args(Monitor)
CLASS_BALANCE: tuple[str, ...] = get_args(ClassBalance)

CUDA_CHUNK_TOKENS = 16384
"""The same on CUDA, where memory is plentiful and a step of a small model is bound by kernel
launches, which each chunk repeats: at 384 tokens, ours trained at 0.6x PEFT's speed on an
H100 (benchmark, SmolLM2-135M shape)."""


@dataclass
class TrainConfig:
    """Optimization settings. Stored in every run's config.json.

    How long to train is chosen on the validation rows: the loop evaluates at regular
    intervals, the caller keeps the best prefix by `monitor` (stopping.EarlyStopping) and
    ends the run after `patience` evaluations without improvement, within a budget of
    `epochs` and `max_minutes`.
    """

    learning_rate: float = 5e-3
    """AdamW step size for the prefix; prefixes tolerate far larger steps than full weights."""
    epochs: int = 8
    """The budget in epochs; with patience the run usually stops before (the learning rate
    decays over this budget, so it also sets the schedule)."""
    batch_size: int = 8
    max_steps: int | None = None
    """Stop after this many steps (0 saves the initialized prefix); None runs all epochs."""
    warmup_share: float = 0.06
    """Linear warm-up over this share of the budget's steps."""
    warmup_steps: int = 0
    """A fixed warm-up length instead of `warmup_share` when above 0 (runs made before
    warmup_share existed stored 10 here, and resume with it)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0
    """Evaluate every N steps (and at the end of each epoch); 0 evaluates twice per epoch."""
    patience: int = 4
    """Stop after this many evaluations in a row without a better `monitor`; 0 never stops
    early."""
    monitor: Monitor = "macro_f1"
    """The validation metric that picks the step to keep: macro_f1 or accuracy (higher is
    better), val_loss (lower is better; what a generation run uses)."""
    keep_best: bool = True
    """Keep the prefix of the best evaluation, not the last step's."""
    max_minutes: float = 0.0
    """Training time budget in minutes (resumes included); 0 has none. At the budget, the
    current step is evaluated and the run ends."""
    class_balance: ClassBalance = "none"
    """none, or sampled: each epoch draws its rows with every class equally likely (with
    replacement), so rare classes weigh as much in the loss as common ones."""
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
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.warmup_share < 1:
            problems.append(f"warmup_share must be in [0, 1), got {self.warmup_share}")
        if self.max_minutes < 0:
            problems.append(f"max_minutes must be 0 or more, got {self.max_minutes}")
        if self.monitor not in MONITORS:
            problems.append(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.class_balance not in CLASS_BALANCE:
            problems.append(f"class_balance must be one of {', '.join(CLASS_BALANCE)}, "
                            f"got {self.class_balance!r}")
        if problems:
            raise ConfigError(problems)

    def total_steps(self, num_examples: int) -> int:
        per_epoch = math.ceil(num_examples / self.batch_size)
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(self.max_steps, total)

    def warmup(self, total: int) -> int:
        """Warm-up steps for a run of `total` steps."""
        return self.warmup_steps or round(self.warmup_share * total)

    def evaluation_interval(self, per_epoch: int) -> int:
        """Steps between evaluations (besides the end of each epoch)."""
        return self.eval_every or max(1, math.ceil(per_epoch / 2))


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

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"prefix.{k}": v for k, v in self.prefix_state.items()}
        out.update({f"optimizer.{k}": v for k, v in self.optimizer_state.items()})
        return out

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, torch.Tensor],
                     elapsed_s: float = 0.0) -> Checkpoint:
        prefix = {k[7:]: v for k, v in tensors.items() if k.startswith("prefix.")}
        opt = {k[10:]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        return cls(step, prefix, opt, elapsed_s)


@dataclass
class TrainResult:
    steps: int
    stopped: bool  # should_stop asked to end early
    last_loss: float | None
    reason: str = ""  # why training ended, in words (budget, patience, time, cancelled)


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


def batch_loss(model: nn.Module, kv: torch.Tensor, batch) -> torch.Tensor:
    """Mean cross-entropy over the label tokens; logits only where the loss reads them."""
    logits = forward(model, kv, batch.input_ids, batch.attention_mask, batch.loss_mask)
    return F.cross_entropy(logits.float(), batch.targets)  # logits: (n_target_tokens, V)


# --- a lean training step for Llama-family decoders on CPU ----------------------------------
#
# batch_loss's loss and gradient, computed with less work and far less memory. All decoder
# layers are one autograd node (`_LlamaStack`) with a hand-written backward:
# - it keeps only what its backward needs, ~0.6 MB per token for SmolLM2-135M where autograd
#   keeps ~1 MB: per layer the input and post-attention residuals, 1/rms, queries, keys and
#   values (prefix included), the attention's log-sum-exp, and the MLP's gate and up;
# - what it keeps lives in a workspace of large blocks reused batch after batch, never in the
#   heap between short-lived tensors, where freed holes that later requests do not fit made
#   the process hold ~1.8x the memory it used;
# - attention runs on the key/value heads (GQA), not on copies repeated per query head, under
#   one (T, P+S+T) mask: prefix, the rows' shared lead of S tokens, then causal. With right
#   padding, no position the loss reads sees padding, and padded positions get no gradient;
# - the lead (a template's head, the same in every row) is computed once, not once per row;
# - the last layer's output projection and MLP run only at the positions the loss reads;
# - frozen weights get no gradient: each linear layer's backward is one matmul.

_LEAN_TYPES = {"llama"}  # model families whose decoder layer `_LlamaStack` reproduces exactly


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


class _Workspace:
    """Memory for what `_LlamaStack` keeps between its forward and backward: large blocks,
    handed out in order and reused for every batch (`reset`), released by `close`."""

    BLOCK = 64 << 20  # bytes; above glibc's largest mmap threshold: never part of the heap

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []
        self.block = self.offset = 0

    def take(self, *shape: int) -> torch.Tensor:
        """An uninitialized float32 tensor of `shape` in the workspace."""
        n = math.prod(shape) * 4
        start = -(-self.offset // 64) * 64  # 64-byte aligned
        if start + n > self.BLOCK:
            self.block, start = self.block + 1, 0
        while self.block >= len(self.blocks):
            self.blocks.append(torch.empty(max(n, self.BLOCK), dtype=torch.uint8))
        if start + n > self.blocks[self.block].numel():  # one tensor larger than a block
            self.blocks[self.block] = torch.empty(start + n, dtype=torch.uint8)
        self.offset = start + n
        return self.blocks[self.block][start : start + n].view(torch.float32).view(shape)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of a float32 `tensor` in the workspace, for one computed outside it (the
        heap) that the backward needs."""
        return self.take(*tensor.shape).copy_(tensor)

    def reset(self) -> None:
        """Call when nothing refers to what `take` returned any more."""
        self.block = self.offset = 0

    def close(self) -> None:
        self.reset()
        self.blocks.clear()


def _rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> None:
    """out = x * cos + rotate_half(x) * sin, written into `out` (any layout, e.g. a permuted
    view of the attention's buffer): four half-width passes, no temporaries."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., h:])


def _rope_backward_into(out: torch.Tensor, grad: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> None:
    """The transpose of `_rope_into` applied to `grad`, written into `out`."""
    h = grad.shape[-1] // 2
    g1, g2, o1, o2 = grad[..., :h], grad[..., h:], out[..., :h], out[..., h:]
    torch.mul(g1, cos[..., :h], out=o1)
    o1.addcmul_(g2, sin[..., h:])
    torch.mul(g2, cos[..., h:], out=o2)
    o2.addcmul_(g1, sin[..., :h], value=-1)


def _rms_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Gradient of w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), with respect to x."""
    gw = grad * weight
    return rstd * (gw - x * (rstd * rstd * (gw * x).mean(-1, keepdim=True)))


class _LlamaStack(torch.autograd.Function):
    """All decoder layers of a Llama model reading a batch after the prefix, as one node.

    forward(kv (L, 2, H_kv, P, D), h (B*T + S, C), ...) -> (n, C). `h` holds the embeddings of
    the rows' own T tokens, flattened, then of S lead tokens that every row starts with (a
    template's head): each row reads prefix, lead, then its own tokens, and the lead is
    computed once for the batch, not once per row. Returns the last layer's output at the n
    positions `keep` (B, T) marks. Only kv gets a gradient.
    """

    @staticmethod
    def forward(ctx, kv, h, inner, keep, rope, rope_lead, bias, bias_lead, ws):
        B, T = keep.shape
        BT = B * T
        S = h.shape[0] - BT  # lead tokens
        P = kv.shape[3]
        cos, sin = rope  # (1, T, 1, D) each
        cos_l, sin_l = rope_lead  # (S, 1, D) each
        keep_flat = keep.reshape(-1)
        layers = inner.layers
        last = len(layers) - 1
        saved = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            D = attn.head_dim
            Hk = attn.k_proj.out_features // D
            G = attn.q_proj.out_features // D // Hk  # query heads per key/value head
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            rstd1 = ws.take(h.shape[0], 1)
            torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm1.variance_epsilon, out=rstd1)
            x = h * rstd1 * norm1.weight  # (N, C)
            q = _linear(x, attn.q_proj.weight, attn.q_proj.bias)  # (N, Hk*G*D)
            k = _linear(x, attn.k_proj.weight, attn.k_proj.bias)  # (N, Hk*D)
            v = _linear(x, attn.v_proj.weight, attn.v_proj.bias)
            qg = ws.take(B, Hk, G * T, D)  # queries grouped by their key/value head, RoPE'd
            _rope_into(qg.view(B, Hk, G, T, D).permute(0, 3, 1, 2, 4),
                       q[:BT].view(B, T, Hk, G, D), cos.unsqueeze(2), sin.unsqueeze(2))
            keys, values = ws.take(B, Hk, P + S + T, D), ws.take(B, Hk, P + S + T, D)
            keys[:, :, :P], values[:, :, :P] = kv[i, 0], kv[i, 1]
            if S:  # row 0's copy, then the others
                _rope_into(keys[0, :, P : P + S].transpose(0, 1), k[BT:].view(S, Hk, D),
                           cos_l, sin_l)
                values[0, :, P : P + S] = v[BT:].view(S, Hk, D).transpose(0, 1)
                keys[1:, :, P : P + S] = keys[0, :, P : P + S]
                values[1:, :, P : P + S] = values[0, :, P : P + S]
            _rope_into(keys[:, :, P + S :].transpose(1, 2), k[:BT].view(B, T, Hk, D), cos, sin)
            values[:, :, P + S :] = v[:BT].view(B, T, Hk, D).transpose(1, 2)
            o_att, lse = _attend(qg, keys, values, bias, attn.scaling)  # (B, Hk, G*T, D)
            o_att, lse = ws.keep(o_att), ws.keep(lse)  # kept for the backward
            o_rows = o_att.view(B, Hk, G, T, D).permute(0, 3, 1, 2, 4)  # (B, T, Hk, G, D)
            lead = None
            if i == last:  # nothing after this layer reads the lead or unscored positions
                o = o_rows.reshape(BT, -1)[keep_flat]  # (n, H*D)
                h_res = h[:BT][keep_flat]  # (n, C)
            else:
                h_res = h
                o = torch.empty(h.shape[0], q.shape[-1])  # (N, H*D): rows, then the lead
                o[:BT].view(B, T, Hk, G, D).copy_(o_rows)
                if S:  # the lead attends to the prefix and itself: row 0's copy of them
                    qgl = ws.take(1, Hk, G * S, D)
                    _rope_into(qgl.view(Hk, G, S, D).permute(2, 0, 1, 3),
                               q[BT:].view(S, Hk, G, D), cos_l.unsqueeze(2),
                               sin_l.unsqueeze(2))
                    ol, lse_l = _attend(qgl, keys[:1, :, : P + S], values[:1, :, : P + S],
                                        bias_lead, attn.scaling)  # (1, Hk, G*S, D)
                    o[BT:].view(S, Hk, G, D).copy_(ol.view(Hk, G, S, D).permute(2, 0, 1, 3))
                    lead = (qgl, ol, lse_l)
            del q, k, v, x, o_rows
            h_in = h if i else None  # the embeddings need no gradient: not kept
            h2 = ws.take(*h_res.shape)
            torch.add(h_res, _linear(o, attn.o_proj.weight, attn.o_proj.bias), out=h2)
            rstd2 = ws.take(h2.shape[0], 1)
            torch.rsqrt(h2.pow(2).mean(-1, keepdim=True) + norm2.variance_epsilon, out=rstd2)
            x = h2 * rstd2 * norm2.weight
            # kept for the backward: in the workspace, not the heap (see _Workspace)
            gate = ws.take(h2.shape[0], mlp.gate_proj.out_features)
            up = ws.take(h2.shape[0], mlp.up_proj.out_features)
            gate.copy_(_linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
            up.copy_(_linear(x, mlp.up_proj.weight, mlp.up_proj.bias))
            out = ws.take(*h2.shape)
            torch.add(h2, _linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias),
                      out=out)
            saved.append((h_in, rstd1, qg, keys, values, o_att, lse, lead, h2, rstd2, gate, up))
            h = out
        ctx.saved = saved
        ctx.inner, ctx.keep, ctx.rope, ctx.rope_lead = inner, keep, rope, rope_lead
        ctx.bias, ctx.bias_lead, ctx.P, ctx.S = bias, bias_lead, P, S
        return h

    @staticmethod
    def backward(ctx, grad):
        inner, keep, P, S = ctx.inner, ctx.keep, ctx.P, ctx.S
        (cos, sin), (cos_l, sin_l) = ctx.rope, ctx.rope_lead
        layers = inner.layers
        last = len(layers) - 1
        B, T = keep.shape
        BT, N = B * T, B * T + S
        keep_flat = keep.reshape(-1)
        Hk, D = ctx.saved[0][3].shape[1], ctx.saved[0][3].shape[-1]
        dkv = torch.zeros(len(layers), 2, Hk, P, D)  # (L, 2, H_kv, P, D)
        dh = grad  # (n, C) at the last layer's output
        for i in range(last, -1, -1):
            h, rstd1, qg, keys, values, o_att, lse, lead, h2, rstd2, gate, up = ctx.saved[i]
            layer = layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            G = qg.shape[2] // T
            # MLP: out = h2 + down(silu(gate) * up)
            da = _linear(dh, mlp.down_proj.weight.t())
            dgate = torch.ops.aten.silu_backward(da * up, gate)
            dup = da * F.silu(gate)
            dx = _linear(dgate, mlp.gate_proj.weight.t()) + _linear(dup, mlp.up_proj.weight.t())
            dh2 = dh + _rms_backward(dx, h2, rstd2, layer.post_attention_layernorm.weight)
            del da, dgate, dup, dx
            # attention output: h2 = h + o_proj(o)
            do = _linear(dh2, attn.o_proj.weight.t())  # (.., H*D)
            if i == last:  # back from the scored positions to all, the lead's left at zero
                do, dh2 = _scatter(do, keep_flat, N), _scatter(dh2, keep_flat, N)
            dog = do[:BT].view(B, T, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * T, D)
            dq, dkeys, dvalues = _attend_backward(dog, qg, keys, values, o_att, lse, ctx.bias,
                                                  attn.scaling)
            dkv[i, 0] = dkeys[:, :, :P].sum(0)
            dkv[i, 1] = dvalues[:, :, :P].sum(0)
            if S:
                dkl = dkeys[:, :, P : P + S].sum(0)  # (Hk, S, D): from every row
                dvl = dvalues[:, :, P : P + S].sum(0)
            dql = None
            if lead is not None:
                qgl, ol, lse_l = lead
                dogl = do[BT:].view(S, Hk, G, D).permute(1, 2, 0, 3).reshape(1, Hk, G * S, D)
                dql, dkeys_l, dvalues_l = _attend_backward(
                    dogl, qgl, keys[:1, :, : P + S], values[:1, :, : P + S], ol, lse_l,
                    ctx.bias_lead, attn.scaling)
                dkv[i, 0] += dkeys_l[0, :, :P]
                dkv[i, 1] += dvalues_l[0, :, :P]
                dkl += dkeys_l[0, :, P:]
                dvl += dvalues_l[0, :, P:]
            if i == 0:  # the embeddings need no gradient
                break
            # the projections' gradients, rows then lead, RoPE undone (its transpose)
            dQ, dK, dV = torch.empty(N, Hk * G * D), torch.empty(N, Hk * D), torch.empty(N, Hk * D)
            _rope_backward_into(dQ[:BT].view(B, T, Hk, G, D),
                                dq.view(B, Hk, G, T, D).permute(0, 3, 1, 2, 4),
                                cos.unsqueeze(2), sin.unsqueeze(2))
            _rope_backward_into(dK[:BT].view(B, T, Hk, D), dkeys[:, :, P + S :].transpose(1, 2),
                                cos, sin)
            dV[:BT].view(B, T, Hk, D).copy_(dvalues[:, :, P + S :].transpose(1, 2))
            if S:
                if dql is None:  # the last layer: the lead's queries read nothing
                    dQ[BT:] = 0
                else:
                    _rope_backward_into(dQ[BT:].view(S, Hk, G, D),
                                        dql.view(Hk, G, S, D).permute(2, 0, 1, 3),
                                        cos_l.unsqueeze(2), sin_l.unsqueeze(2))
                _rope_backward_into(dK[BT:].view(S, Hk, D), dkl.transpose(0, 1), cos_l, sin_l)
                dV[BT:].view(S, Hk, D).copy_(dvl.transpose(0, 1))
            dx = (_linear(dQ, attn.q_proj.weight.t()) + _linear(dK, attn.k_proj.weight.t())
                  + _linear(dV, attn.v_proj.weight.t()))
            dh = dh2 + _rms_backward(dx, h, rstd1, layer.input_layernorm.weight)
        ctx.saved = None
        return dkv, None, None, None, None, None, None, None, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x @ weight^T + bias through oneDNN where torch has it (any layout of `weight`: the
    backward passes weight^T as a view). On this project's AMD EPYC (AVX-512) oneDNN ran
    SmolLM2's float32 products at 185-210 GFLOP/s where torch's default (MKL, which takes
    its AVX2 path on AMD) ran 117-177."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    return F.linear(x, weight, bias)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN caches a primitive, with its own packed-weight scratch memory, per matmul shape, up to
# 1024 of them: length-bucketed batches bring a new row count each, and the cache grew the
# benchmark's peak RSS by ~0.2 GB. 16 holds what one batch uses. Read when oneDNN makes its
# first primitive, so this takes effect unless something ran oneDNN before this import.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def _attend(qg, keys, values, bias, scaling: float):
    """softmax(qg keys^T * scaling + bias) values, grouped-query, and its log-sum-exp, which
    the backward needs: qg (B, Hk, G*T, D), keys/values (B, Hk, S, D), bias (G*T, S).

    torch's fused CPU attention kernels (flash attention, blocked: no (G*T, S) score tensor is
    materialized) ran forward plus backward 1.4x faster than the same as separate ops here."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, keys, values, attn_mask=bias, scale=scaling)


def _attend_backward(dog, qg, keys, values, out, lse, bias, scaling: float):
    """Gradients of `_attend` for queries, keys and values; `out` and `lse` are its results."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dog, qg, keys, values, out, lse, 0.0, False, attn_mask=bias, scale=scaling)


def _scatter(rows: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """(n, C) zeros with `rows` at the positions `keep` marks among the first len(keep)."""
    full = rows.new_zeros(n, rows.shape[-1])
    full[: len(keep)][keep] = rows
    return full


def _causal_bias(t: int, before: int) -> torch.Tensor:
    """(t, before + t) additive mask: every query sees the `before` keys, then causal."""
    visible = torch.ones(t, before + t, dtype=torch.bool).tril(before)
    return torch.zeros(t, before + t).masked_fill_(~visible, float("-inf"))


def _lead_length(batch) -> int:
    """How many leading tokens every row of the batch shares (a template's head), short of
    the first position whose logit scores a target."""
    ids = batch.input_ids
    if ids.shape[0] < 2:
        return 0
    first_scored = int(batch.loss_mask.long().argmax(1).min())
    same = (ids == ids[:1]).all(0)[:first_scored]
    return int(same.long().cumprod(0).sum())


def _lean_loss(model: nn.Module, kv: torch.Tensor, batch, ws: _Workspace | None = None):
    """batch_loss for a right-padded batch on a supported model (see `_lean_supported`)."""
    inner = model.model
    S = _lead_length(batch)
    ids = batch.input_ids[:, S:]
    B, T = ids.shape
    P = kv.shape[3]
    with torch.no_grad():
        h = inner.embed_tokens(torch.cat([ids.reshape(-1), batch.input_ids[0, :S]]))  # (N, C)
        positions = torch.arange(P, P + S + T).unsqueeze(0)  # after the prefix: lead, rows
        cos, sin = inner.rotary_emb(h, positions)  # (1, S+T, D) each
        rope_lead = cos[0, :S].unsqueeze(1), sin[0, :S].unsqueeze(1)  # (S, 1, D)
        rope = cos[:, S:].unsqueeze(2), sin[:, S:].unsqueeze(2)  # (1, T, 1, D)
        # queries are grouped by key/value head, G per head: the masks repeat G times
        G = model.config.num_attention_heads // model.config.num_key_value_heads
        bias = _causal_bias(T, P + S).repeat(G, 1)  # rows: prefix, lead, then causal
        bias_lead = _causal_bias(S, P).repeat(G, 1)  # the lead: prefix, then causal
    h = _LlamaStack.apply(kv, h, inner, batch.loss_mask[:, S:], rope, rope_lead, bias,
                          bias_lead, ws or _Workspace())
    h = _RMSNorm.apply(h, inner.norm.weight, inner.norm.variance_epsilon)  # (n, C)
    head = model.get_output_embeddings()
    if head.bias is not None:
        return F.cross_entropy(head(h).float(), batch.targets)
    return _HeadCrossEntropy.apply(h, head.weight, batch.targets)


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits h @ W^T (W frozen) at the n loss positions.

    With a few rows, reading the (V, C) weight is the whole cost: W @ h^T runs at memory
    speed where h @ W^T took 2x longer (16 vs 7 ms for SmolLM2's 49152 x 576 at n = 8), and
    the backward's (n, V) @ (V, C) is fastest as a batch of products over vocabulary slices.
    """

    SLICES = 8

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        logits = (weight @ h.t()).t()  # (n, V)
        lse = torch.logsumexp(logits, -1)  # (n,)
        rows = torch.arange(len(targets))
        loss = (lse - logits[rows, targets]).mean()
        ctx.save_for_backward(logits, lse, targets)
        ctx.weight = weight
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        weight = ctx.weight
        n, V = logits.shape
        dlogits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: not needed again
        dlogits[torch.arange(n), targets] -= 1
        dlogits.mul_(grad / n)
        k = _HeadCrossEntropy.SLICES
        if V % k:
            return dlogits @ weight, None, None
        parts = torch.bmm(dlogits.view(n, k, V // k).transpose(0, 1),
                          weight.view(k, V // k, -1))  # (k, n, C)
        return parts.sum(0), None, None


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
        return _rms_backward(grad, x, rstd, ctx.weight), None, None


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
    model: nn.Module, kv: torch.Tensor, examples: Sequence[Example], pad_id: int,
    device: torch.device, max_tokens: int, workspace: _Workspace | None = None,
) -> tuple[float, int, int]:
    """The batch's mean loss, its gradient accumulated through `kv`.

    Returns (loss, non-padding tokens, padded tokens).

    The batch is read in chunks of at most `max_tokens` padded tokens, so activation memory
    is bounded whatever the rows' lengths. Each chunk's mean is weighted by its share of the
    batch's label tokens: the sum is the whole batch's mean loss, and so is the gradient.
    Llama-family models on CPU take the lean path (`_lean_loss`), with `workspace` reused.
    """
    leaf = kv if kv.is_leaf else kv.detach().requires_grad_()  # chunks add their grads here
    n_targets = sum(len(e.target) for e in examples)
    total, real, padded = 0.0, 0, 0
    lean = _lean_supported(model)
    ws = workspace or _Workspace()
    for chunk in _chunks(examples, max_tokens):
        batch = collate(chunk, pad_id).to(device)
        with autocast(device), _attention_backends(device):
            loss = _lean_loss(model, leaf, batch, ws) if lean else batch_loss(model, leaf, batch)
            loss = loss * (batch.targets.numel() / n_targets)
        loss.backward()
        ws.reset()
        total += float(loss.detach())
        real += batch.real_tokens
        padded += batch.input_ids.numel()
    if leaf is not kv:  # e.g. through the reparameterization MLP, once per batch
        kv.backward(leaf.grad)
    return total, real, padded


def _attention_backends(device: torch.device):
    """On CUDA, SDPA without cuDNN's kernels: cuDNN builds a plan for each new sequence length,
    and length-bucketed batches bring many. On an H100 the first epoch of the benchmark took
    19.6 s where the second took 7.7 s; PEFT's batches, padded to the longest of random rows,
    repeat fewer lengths."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


class ThreadTuner:
    """Picks torch's CPU thread count step by step, from what each step measures.

    On cores that other processes also use, every parallel op waits at an OpenMP barrier for
    a thread the scheduler has not run yet: on 2 shared cores we measured a training step 6x
    slower with 2 threads than with 1. On idle cores, 2 threads are ~1.8x faster than 1. So
    the tuner runs torch's thread count while its threads get the CPU time they ask for, and
    tries one thread for a step when they do not; it runs one thread while no core is idle,
    and tries the full count for a step when one is (from /proc/stat; without it, now and
    then). A try is kept if its step ran faster per padded token. A try that loses waits
    twice as long before the next.

    Inactive (a no-op) on CUDA, with one thread, or when OMP_NUM_THREADS pins the count.
    """

    BUSY = 0.8  # CPU seconds per wall second per thread below which our threads were starved
    IDLE = 0.3  # share of the machine's CPU time left idle above which a core is free

    def __init__(self, device: torch.device, max_wait: int = 32, *,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time,
                 machine_cpu: Callable[[], tuple[int, int] | None] | None = None):
        """`clock`, `cpu_clock` (this process) and `machine_cpu` ((idle, total) ticks of the
        machine, `_machine_cpu`) are what it measures, replaceable in tests."""
        self.clock, self.cpu_clock = clock, cpu_clock
        self.machine_cpu = machine_cpu or _machine_cpu
        self.initial = torch.get_num_threads()
        self.active = (device.type == "cpu" and self.initial > 1
                       and "OMP_NUM_THREADS" not in os.environ)
        self.current = self.initial
        self.cost: dict[int, float] = {}  # threads -> seconds per padded token, recent
        self.wait = 1  # steps between tries: doubles after a try that loses
        self.max_wait = max_wait
        self.since_try = 0
        self.want_try = False
        self._trying: int | None = None
        self._start: tuple[float, float, tuple[int, int] | None] = (0.0, 0.0, None)

    def start(self) -> None:
        """Call before a step: sets the thread count it runs with."""
        if not self.active:
            return
        other = 1 if self.current == self.initial else self.initial
        self._trying = other if self.want_try and self.since_try >= self.wait else None
        torch.set_num_threads(self._trying or self.current)
        self._start = (self.clock(), self.cpu_clock(), self.machine_cpu())

    def stop(self, work: int) -> None:
        """Call after a step with its work (padded tokens)."""
        if not self.active or work <= 0:
            return
        wall0, cpu0, machine0 = self._start
        wall = max(self.clock() - wall0, 1e-9)
        n = self._trying or self.current
        cost = wall / work
        old = self.cost.get(n)
        # A try replaces what is known of a count; the running count is smoothed over steps.
        self.cost[n] = cost if old is None or self._trying else 0.5 * old + 0.5 * cost
        if self._trying is not None:
            self.since_try = 0
            if self.cost[n] < self.cost.get(self.current, float("inf")):
                self.current, self.wait = n, 1
            else:
                self.wait = min(2 * self.wait, self.max_wait)
        else:
            self.since_try += 1
        if self.current == self.initial:  # starved threads: try one
            share = (self.cpu_clock() - cpu0) / (wall * n)
            self.want_try = share < self.BUSY
        else:  # a free core: try them all
            machine = self.machine_cpu()
            if machine is None or machine0 is None:
                self.want_try = self.since_try >= self.max_wait
            else:
                idle, total = machine[0] - machine0[0], machine[1] - machine0[1]
                self.want_try = total > 0 and idle / total > self.IDLE

    def close(self) -> None:
        """Restore the thread count found at the start."""
        if self.active:
            torch.set_num_threads(self.initial)


def _load_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where there is none (not Linux, or musl)."""
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def trim() -> None:
        malloc_trim(0)

    return trim


_trim_heap = _load_trim()
"""Hands the heap's free pages back to the OS. Called after each CPU step: matmul scratch
memory freed between the tensors the step kept leaves holes the next batch's shapes do not
fit, and trimming them took the peak RSS of a 2-epoch run from 1.44 to 1.40 GB for 3 ms a
step."""


def _machine_cpu() -> tuple[int, int] | None:
    """(idle, total) CPU time of the whole machine in clock ticks, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)  # idle + iowait


def train(
    model: nn.Module,
    prefix: Prefix,
    examples: Sequence[Example],
    cfg: TrainConfig,
    pad_id: int,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    evaluate: Callable[[int], str | None] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train `prefix` on `examples` with `model` frozen.

    `evaluate(step)` runs every `cfg.evaluation_interval` steps, at the end of each epoch
    and when the time budget runs out; it returns a reason to end training (e.g. patience
    ran out) or None to go on. `on_checkpoint` gets a checkpoint every `checkpoint_every`
    steps and at the end.
    """
    device = next(model.parameters()).device
    prefix.to(device)
    params = [p for p in prefix.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start, before = 0, 0.0
    if resume is not None:
        prefix.load_state_dict({k: v.to(device) for k, v in resume.prefix_state.items()})
        if resume.optimizer_state:
            _load_optimizer(optimizer, resume.optimizer_state)
        start, before = resume.step, resume.elapsed_s

    labels = [e.label for e in examples]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.total_steps(len(examples))
    interval = cfg.evaluation_interval(per_epoch)
    budget_s = cfg.max_minutes * 60

    began = time.perf_counter()

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            state = {k: v.detach().cpu().clone() for k, v in prefix.state_dict().items()}
            on_checkpoint(Checkpoint(step, state, _optimizer_tensors(optimizer),
                                     before + time.perf_counter() - began))

    seen = tokens = 0
    loss_value = None
    step = start
    epoch_batches: dict[int, list[list[Example]]] = {}
    tuner = ThreadTuner(device)
    workspace = _Workspace()
    chunk_tokens = CUDA_CHUNK_TOKENS if device.type == "cuda" else CHUNK_TOKENS
    reason = f"budget of {cfg.epochs} epochs" if cfg.max_steps is None or total < cfg.max_steps \
        else f"max_steps {cfg.max_steps}"
    try:
        while step < total:
            if should_stop is not None and should_stop():
                checkpoint(step)
                return TrainResult(step, True, loss_value, "cancelled")
            epoch, index = divmod(step, per_epoch)
            if epoch not in epoch_batches:
                order = epoch_order(labels, cfg.class_balance, cfg.seed, epoch)
                batches = bucketed_batches([len(examples[i]) for i in order], cfg.batch_size,
                                           cfg.seed, epoch)
                epoch_batches = {epoch: [[examples[order[i]] for i in b] for b in batches]}
            rows = epoch_batches[epoch][index]

            lr = learning_rate_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            tuner.start()
            loss_value, real, padded = _backward(model, prefix.key_values(), rows, pad_id, device,
                                                 chunk_tokens, workspace)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            tuner.stop(padded)
            if device.type == "cpu":
                _trim_heap()

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
            out_of_time = bool(budget_s) and before + elapsed >= budget_s and step != total
            end_of_epoch = step % per_epoch == 0 or step == total
            if evaluate is not None and (end_of_epoch or step % interval == 0 or out_of_time):
                verdict = evaluate(step)
                if verdict:
                    checkpoint(step)
                    return TrainResult(step, False, loss_value, verdict)
            if out_of_time:
                checkpoint(step)
                return TrainResult(step, False, loss_value,
                                   f"time budget of {cfg.max_minutes:g} min")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total:
                checkpoint(step)
        checkpoint(step)
        return TrainResult(step, False, loss_value, reason)
    finally:
        tuner.close()
        workspace.close()
