"""A lean training step for Llama-family decoders on CPU: `prefixlab.engine.train.batch_loss`'s loss
and gradient, computed with less work and far less memory.

All decoder layers are one autograd node (`_LlamaStack`) with a hand-written backward:
- it keeps only what its backward needs, far less than autograd keeps: per layer the input
  and post-attention residuals, 1/rms, queries, keys and
  values (prefix included), the attention's log-sum-exp, and the MLP's gate and up;
- what it keeps lives in a workspace of large blocks reused batch after batch, never in the
  heap between short-lived tensors, where freed holes that later requests do not fit make
  the process hold far more memory than it uses;
- attention runs on the key/value heads (GQA), not on copies repeated per query head, under
  one (T, P+S+T) mask: prefix, the rows' shared lead of S tokens, then causal. With right
  padding, no position the loss reads sees padding, and padded positions get no gradient;
- the lead (a template's head, the same in every row) is computed once, not once per row;
- the last layer's output projection and MLP run only at the positions the loss reads;
- frozen weights get no gradient: each linear layer's backward is one matmul;
- with bfloat16 weights the matmuls, attention and the residual stream run in bf16, as the
  model's own modules do (`batch_loss`), while rms-norm statistics, attention's
  log-sum-exp, the logits' softmax and loss, the gradient along the residual stream and the
  prefix's gradient stay float32. The prefix is cast to bf16 once per call.

Registered with the llama family in `prefixlab.engine.families` (`lean_training_loss`), which
`train()` asks for its loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.engine.cpu import linear
from prefixlab.engine.encode import weighted_mean


def lean_supported(model: nn.Module) -> bool:
    """Whether `lean_loss` computes what batch_loss computes for this model: a model of a
    family that registers this step (prefixlab.engine.families), frozen, on CPU, with its
    weights all float32 (the same up to summation order) or all bfloat16 (the same up to
    bf16 rounding, see the module docstring)."""
    if getattr(model.config, "hidden_act", None) != "silu":
        return False
    if next(model.parameters()).device.type != "cpu" or model.training:
        return False
    if any(p.requires_grad for p in model.parameters()):
        return False
    if {p.dtype for p in model.parameters()} not in ({torch.float32}, {torch.bfloat16}):
        return False
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


class Workspace:
    """Memory for what `_LlamaStack` keeps between its forward and backward: large blocks,
    handed out in order and reused for every batch (`reset`), released by `close`."""

    BLOCK = 64 << 20  # bytes; above glibc's largest mmap threshold: never part of the heap

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []
        self.block = self.offset = 0

    def take(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype` in the workspace."""
        n = math.prod(shape) * dtype.itemsize
        start = -(-self.offset // 64) * 64  # 64-byte aligned
        if start + n > self.BLOCK:
            self.block, start = self.block + 1, 0
        while self.block >= len(self.blocks):
            self.blocks.append(torch.empty(max(n, self.BLOCK), dtype=torch.uint8))
        if start + n > self.blocks[self.block].numel():  # one tensor larger than a block
            self.blocks[self.block] = torch.empty(start + n, dtype=torch.uint8)
        self.offset = start + n
        return self.blocks[self.block][start : start + n].view(dtype).view(shape)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` in the workspace, for one computed outside it (the heap) that
        the backward needs."""
        return self.take(*tensor.shape, dtype=tensor.dtype).copy_(tensor)

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


def _rms_stat(x: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """rstd = 1/sqrt(mean(x^2) + eps) over the last dimension, in float32 whatever x's dtype
    (a bf16 mean of squares loses the small ones), as the model's own norm computes it."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps, out=out)


def _rms_apply(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w * x * rstd in x's dtype: the product x * rstd is float32, rounded once to x's dtype
    before the weight, in the model's own norm's order."""
    return (x * rstd).to(x.dtype) * weight


def _rms_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Gradient of w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), with respect to x: float32
    whatever the inputs' dtype (the mean over C is a sum of C products)."""
    gw = grad.float() * weight
    x = x.float()
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
        ctx.kv_dtype = kv.dtype
        kv = kv.to(h.dtype)  # a float32 prefix, once for all layers: (L, 2, H_kv, P, D)
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
            rstd1 = _rms_stat(h, norm1.variance_epsilon, out=ws.take(h.shape[0], 1))  # float32
            x = _rms_apply(h, rstd1, norm1.weight)  # (N, C)
            q = linear(x, attn.q_proj.weight, attn.q_proj.bias)  # (N, Hk*G*D)
            k = linear(x, attn.k_proj.weight, attn.k_proj.bias)  # (N, Hk*D)
            v = linear(x, attn.v_proj.weight, attn.v_proj.bias)
            # queries grouped by their key/value head, RoPE'd
            qg = ws.take(B, Hk, G * T, D, dtype=h.dtype)
            _rope_into(qg.view(B, Hk, G, T, D).permute(0, 3, 1, 2, 4),
                       q[:BT].view(B, T, Hk, G, D), cos.unsqueeze(2), sin.unsqueeze(2))
            keys = ws.take(B, Hk, P + S + T, D, dtype=h.dtype)
            values = ws.take(B, Hk, P + S + T, D, dtype=h.dtype)
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
                o = h.new_empty(h.shape[0], q.shape[-1])  # (N, H*D): rows, then the lead
                o[:BT].view(B, T, Hk, G, D).copy_(o_rows)
                if S:  # the lead attends to the prefix and itself: row 0's copy of them
                    qgl = ws.take(1, Hk, G * S, D, dtype=h.dtype)
                    _rope_into(qgl.view(Hk, G, S, D).permute(2, 0, 1, 3),
                               q[BT:].view(S, Hk, G, D), cos_l.unsqueeze(2),
                               sin_l.unsqueeze(2))
                    ol, lse_l = _attend(qgl, keys[:1, :, : P + S], values[:1, :, : P + S],
                                        bias_lead, attn.scaling)  # (1, Hk, G*S, D)
                    o[BT:].view(S, Hk, G, D).copy_(ol.view(Hk, G, S, D).permute(2, 0, 1, 3))
                    lead = (qgl, ol, lse_l)
            del q, k, v, x, o_rows
            h_in = h if i else None  # the embeddings need no gradient: not kept
            h2 = ws.take(*h_res.shape, dtype=h.dtype)
            torch.add(h_res, linear(o, attn.o_proj.weight, attn.o_proj.bias), out=h2)
            rstd2 = _rms_stat(h2, norm2.variance_epsilon, out=ws.take(h2.shape[0], 1))
            x = _rms_apply(h2, rstd2, norm2.weight)
            # kept for the backward: in the workspace, not the heap (see Workspace)
            gate = ws.take(h2.shape[0], mlp.gate_proj.out_features, dtype=h.dtype)
            up = ws.take(h2.shape[0], mlp.up_proj.out_features, dtype=h.dtype)
            gate.copy_(linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
            up.copy_(linear(x, mlp.up_proj.weight, mlp.up_proj.bias))
            out = ws.take(*h2.shape, dtype=h.dtype)
            torch.add(h2, linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias),
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
        dt = ctx.saved[0][3].dtype  # the weights' (compute) dtype
        dkv = torch.zeros(len(layers), 2, Hk, P, D)  # (L, 2, H_kv, P, D), float32
        # (n, C) at the last layer's output; float32 along the residual stream, cast to the
        # compute dtype only where a matmul reads it (no copy when that is float32)
        dh = grad.float()
        for i in range(last, -1, -1):
            h, rstd1, qg, keys, values, o_att, lse, lead, h2, rstd2, gate, up = ctx.saved[i]
            layer = layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            G = qg.shape[2] // T
            # MLP: out = h2 + down(silu(gate) * up)
            da = linear(dh.to(dt), mlp.down_proj.weight.t())
            dgate = torch.ops.aten.silu_backward(da * up, gate)
            dup = da * F.silu(gate)
            dx = linear(dgate, mlp.gate_proj.weight.t()) + linear(dup, mlp.up_proj.weight.t())
            dh2 = dh + _rms_backward(dx, h2, rstd2, layer.post_attention_layernorm.weight)
            del da, dgate, dup, dx
            # attention output: h2 = h + o_proj(o)
            do = linear(dh2.to(dt), attn.o_proj.weight.t())  # (.., H*D)
            if i == last:  # back from the scored positions to all, the lead's left at zero
                do, dh2 = _scatter(do, keep_flat, N), _scatter(dh2, keep_flat, N)
            dog = do[:BT].view(B, T, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * T, D)
            dq, dkeys, dvalues = _attend_backward(dog, qg, keys, values, o_att, lse, ctx.bias,
                                                  attn.scaling)
            # sums over rows in float32, whatever the compute dtype
            dkv[i, 0] = dkeys[:, :, :P].sum(0, dtype=torch.float32)
            dkv[i, 1] = dvalues[:, :, :P].sum(0, dtype=torch.float32)
            if S:
                dkl = dkeys[:, :, P : P + S].sum(0, dtype=torch.float32)  # (Hk, S, D): all rows
                dvl = dvalues[:, :, P : P + S].sum(0, dtype=torch.float32)
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
            dQ = torch.empty(N, Hk * G * D, dtype=dt)
            dK, dV = torch.empty(N, Hk * D, dtype=dt), torch.empty(N, Hk * D, dtype=dt)
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
            dx = (linear(dQ, attn.q_proj.weight.t()) + linear(dK, attn.k_proj.weight.t())
                  + linear(dV, attn.v_proj.weight.t()))
            dh = dh2 + _rms_backward(dx, h, rstd1, layer.input_layernorm.weight)
        ctx.saved = None
        return dkv.to(ctx.kv_dtype), None, None, None, None, None, None, None, None


def _attend(qg, keys, values, bias, scaling: float):
    """softmax(qg keys^T * scaling + bias) values, grouped-query, and its log-sum-exp, which
    the backward needs: qg (B, Hk, G*T, D), keys/values (B, Hk, S, D), bias (G*T, S).

    torch's fused CPU attention kernels (flash attention, blocked: no (G*T, S) score tensor is
    materialized), faster than the same as separate ops."""
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


def lead_length(batch) -> int:
    """How many leading tokens every row of the batch shares (a template's head), short of
    the first position whose logit scores a target."""
    ids = batch.input_ids
    if ids.shape[0] < 2:
        return 0
    first_scored = int(batch.loss_mask.long().argmax(1).min())
    same = (ids == ids[:1]).all(0)[:first_scored]
    return int(same.long().cumprod(0).sum())


def lean_loss(model: nn.Module, kv: torch.Tensor, batch, ws: Workspace | None = None):
    """batch_loss for a right-padded batch on a supported model (see `lean_supported`)."""
    inner = model.model
    S = lead_length(batch)
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
                          bias_lead, ws or Workspace())
    h = _RMSNorm.apply(h, inner.norm.weight, inner.norm.variance_epsilon)  # (n, C)
    head = model.get_output_embeddings()
    if head.bias is not None:
        return weighted_mean(F.cross_entropy(head(h).float(), batch.targets, reduction="none"),
                             batch.weights)
    return _HeadCrossEntropy.apply(h, head.weight, batch.targets, batch.weights)


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean (or weighted mean) cross-entropy of logits h @ W^T (W frozen) at the n loss
    positions.

    With a few rows, reading the (V, C) weight is the whole cost: W @ h^T runs at memory
    speed where h @ W^T does not, and
    the backward's (n, V) @ (V, C) is fastest as a batch of products over vocabulary slices.
    """

    SLICES = 8

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor | None = None):
        # the matmul in the weights' dtype, the softmax and loss in float32, as batch_loss
        logits = (weight @ h.t()).t().float()  # (n, V)
        lse = torch.logsumexp(logits, -1)  # (n,)
        rows = torch.arange(len(targets))
        loss = weighted_mean(lse - logits[rows, targets], token_weights)
        # each row's share of the mean: 1/n, or its weight over the weights' sum
        share = (token_weights / token_weights.sum() if token_weights is not None
                 else torch.full((len(targets),), 1.0 / len(targets)))
        ctx.save_for_backward(logits, lse, targets, share)
        ctx.weight = weight
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets, share = ctx.saved_tensors
        weight = ctx.weight
        n, V = logits.shape
        dlogits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: not needed again
        dlogits[torch.arange(n), targets] -= 1
        dlogits.mul_((grad * share).to(dlogits.dtype).unsqueeze(1))
        # rounded to the weights' dtype for the matmul (no copy when that is float32): a
        # float32 copy of a bf16 (V, C) weight would cost more than the whole step's memory
        dlogits = dlogits.to(weight.dtype)
        k = _HeadCrossEntropy.SLICES
        if V % k:
            return dlogits @ weight, None, None, None
        parts = torch.bmm(dlogits.view(n, k, V // k).transpose(0, 1),
                          weight.view(k, V // k, -1))  # (k, n, C)
        return parts.sum(0, dtype=torch.float32), None, None, None


class _RMSNorm(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps), with w frozen; keeps x and 1/rms (float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = _rms_stat(x, eps)  # (..., 1), float32
        ctx.save_for_backward(x, rstd)
        ctx.weight = weight
        return weight * (x * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd = ctx.saved_tensors
        return _rms_backward(grad, x, rstd, ctx.weight), None, None


class LeanLoss:
    """`lean_loss` with a workspace kept across batches: a family's `TrainingLoss`."""

    def __init__(self) -> None:
        self.workspace = Workspace()

    def __call__(self, model: nn.Module, kv: torch.Tensor, batch) -> torch.Tensor:
        return lean_loss(model, kv, batch, self.workspace)

    def release(self) -> None:
        self.workspace.reset()

    def close(self) -> None:
        self.workspace.close()


def lean_training_loss(model: nn.Module) -> LeanLoss | None:
    """The lean step for `model`, or None where it does not apply (see `lean_supported`)."""
    return LeanLoss() if lean_supported(model) else None
