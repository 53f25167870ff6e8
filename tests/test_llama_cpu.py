"""The lean Llama CPU step gives batch_loss's loss and gradient, with less memory.

Its loss-and-gradient tests use 3-layer models: the first, a middle and the last layer take
different branches (the last reads only scored positions; the lead's queries get a gradient
only where a later layer reads the lead).

Its pieces (head cross-entropy, RoPE written in place) match autograd; its workspace is reused
batch after batch without mixing them; it is not used where it does not apply.

On a bfloat16 model it is compared with batch_loss on the same bf16 model. Both round every
matmul's inputs and outputs to bf16 (8 significant bits, 2^-9 relative per rounding), but in
different places (fused RoPE and attention, float32 sums of row gradients), so they agree to
bf16 noise, not bit for bit. Measured on the 3-layer tiny Llama (vocab 300 and 304, with and
without a shared lead): loss within 7e-4 relative, prefix gradient cosine above 0.9996, its
norm within 1.5e-2 relative; autograd's own bf16 gradient is as far from float32's (cosine
0.9996-0.9999). The bounds below leave about twice that room.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefixlab.engine import llama_cpu
from prefixlab.engine.encode import Encoder, Template, collate
from prefixlab.engine.families import family_of
from prefixlab.engine.prefix import Prefix, PrefixConfig, init_prefix
from prefixlab.engine.train import _backward, batch_loss

from .conftest import LABELS, TEXTS, loss_and_grad, sentiment_batch, tiny_model


def test_lean_forward_matches_batch_loss_with_padding_and_multi_token_labels(tokenizer):
    from prefixlab.engine.models import prepare_model

    loaded = prepare_model(tiny_model("llama", layers=3), tokenizer, "tiny-llama",
                           torch.device("cpu"))
    assert llama_cpu.lean_supported(loaded.model)
    # a two-token label, so the loss reads two positions in some rows
    gold = ["positive", "negative neither", "positive", "positive", "negative neither",
            "positive"]
    examples, kv = sentiment_batch(loaded, ("negative neither", "positive"), gold)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    assert batch.attention_mask.min() == 0  # rows of different lengths: right padding
    want = loss_and_grad(batch_loss, loaded.model, kv, batch)
    got = loss_and_grad(llama_cpu.lean_loss, loaded.model, kv, batch)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("template, texts, lead", [
    ("Text: {text}\nCategory ({labels}):", TEXTS, "head"),  # the template's head is shared
    ("{text} =>", TEXTS, "none"),  # nothing shared
    ("Text: {text}\nCategory ({labels}):", ["good great film", "good great", "good"] * 2,
     "more"),  # the texts share words too; identical prompts stop before the scored position
])
def test_lean_step_reads_a_shared_lead_once_with_the_same_loss_and_gradient(
        tokenizer, template, texts, lead):
    from prefixlab.engine.models import prepare_model

    loaded = prepare_model(tiny_model("llama", layers=3), tokenizer, "tiny-llama",
                           torch.device("cpu"))
    enc = Encoder(loaded.tokenizer, Template(template), ["negative", "positive"], max_length=64)
    examples = enc.examples(texts, LABELS)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    kv = prefix.kv
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    shared = llama_cpu.lead_length(batch)
    head = len(enc.head_ids)
    assert {"head": shared == head, "none": shared == 0, "more": shared > head}[lead]
    want = loss_and_grad(batch_loss, loaded.model, kv, batch)
    got = loss_and_grad(llama_cpu.lean_loss, loaded.model, kv, batch)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    one = collate(examples[:1], loaded.tokenizer.pad_token_id)  # one row: no lead
    assert llama_cpu.lead_length(one) == 0
    torch.testing.assert_close(loss_and_grad(llama_cpu.lean_loss, loaded.model, kv, one)[1],
                               loss_and_grad(batch_loss, loaded.model, kv, one)[1],
                               atol=1e-6, rtol=1e-5)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("template, vocab", [
    ("Text: {text}\nCategory ({labels}):", 304),  # a shared lead; the sliced head backward
    ("{text} =>", 300),  # no lead; the plain head backward
])
def test_lean_step_on_a_bfloat16_model_matches_batch_loss_to_bf16_rounding(
        tokenizer, template, vocab):
    from prefixlab.engine.models import prepare_model

    loaded = prepare_model(tiny_model("llama", vocab_size=vocab, layers=3), tokenizer,
                           "tiny-llama", torch.device("cpu"), torch.bfloat16)
    assert llama_cpu.lean_supported(loaded.model)
    enc = Encoder(loaded.tokenizer, Template(template), ["negative", "positive"], max_length=64)
    batch = collate(enc.examples(TEXTS, LABELS), loaded.tokenizer.pad_token_id)
    _, kv = sentiment_batch(loaded)
    # as train's _backward hands it over: the float32 master cast to bf16 once per step
    leaf = kv.detach().to(torch.bfloat16).requires_grad_()
    want_loss, want_grad = loss_and_grad(batch_loss, loaded.model, leaf, batch)
    loss, grad = loss_and_grad(llama_cpu.lean_loss, loaded.model, leaf, batch)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert float(loss) == pytest.approx(float(want_loss), rel=2e-3)
    assert _cosine(grad, want_grad) > 0.999
    assert float(grad.float().norm()) == pytest.approx(float(want_grad.float().norm()), rel=3e-2)
    # a float32 prefix is cast inside, and its gradient comes back float32
    loss32, grad32 = loss_and_grad(llama_cpu.lean_loss, loaded.model,
                                   kv.detach().requires_grad_(), batch)
    assert grad32.dtype == torch.float32 and float(loss32) == float(loss)
    assert _cosine(grad32, grad.float()) > 0.9999


def test_a_bfloat16_training_step_takes_the_lean_path(tokenizer):
    from prefixlab.engine.models import prepare_model

    loaded = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", torch.device("cpu"),
                           torch.bfloat16)
    examples, kv = sentiment_batch(loaded)
    lean = family_of(loaded.model.config).fast_training_loss(loaded.model)  # what train() asks
    assert isinstance(lean, llama_cpu.LeanLoss)
    leaf = kv.detach().clone().requires_grad_(True)  # the float32 master
    pad = loaded.tokenizer.pad_token_id
    _backward(loaded.model, leaf, examples, pad, torch.device("cpu"), 10_000, lean)
    assert leaf.grad is not None and leaf.grad.dtype == torch.float32
    assert len(lean.workspace.blocks) == 1  # the lean step ran: only it fills a workspace
    want = kv.detach().clone().requires_grad_(True)
    _backward(loaded.model, want, examples, pad, torch.device("cpu"), 10_000)  # autograd
    assert _cosine(leaf.grad, want.grad) > 0.999
    lean.close()


def test_workspace_hands_out_each_dtype_at_its_own_size():
    ws = llama_cpu.Workspace()
    half = ws.take(3, 5, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ws.offset == 3 * 5 * 2
    full = ws.take(2, 4)
    assert full.dtype == torch.float32 and ws.offset == 64 + 2 * 4 * 4  # 64-byte aligned
    full.fill_(1.0)
    half.fill_(2.0)  # neither overlaps the other
    assert bool((full == 1.0).all()) and bool((half == 2.0).all())
    kept = ws.keep(torch.ones(3, dtype=torch.bfloat16))
    assert kept.dtype == torch.bfloat16
    ws.close()


def test_lean_forward_is_not_used_where_it_does_not_apply(tokenizer):
    from prefixlab.engine.models import prepare_model

    gpt2 = prepare_model(tiny_model("gpt2"), tokenizer, "tiny-gpt2", torch.device("cpu"))
    assert not llama_cpu.lean_supported(gpt2.model)
    llama = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", torch.device("cpu"))
    llama.model.model.norm.weight.requires_grad_(True)  # not a frozen model any more
    assert not llama_cpu.lean_supported(llama.model)
    llama.model.model.norm.weight.requires_grad_(False)
    llama.model.model.norm.to(torch.bfloat16)  # weights of two dtypes
    assert not llama_cpu.lean_supported(llama.model)
    llama.model.to(torch.float16)  # a dtype it has no path for
    assert not llama_cpu.lean_supported(llama.model)


def test_lean_step_reuses_its_workspace_without_mixing_batches(tokenizer):
    from prefixlab.engine.models import prepare_model

    loaded = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", torch.device("cpu"))
    examples, kv = sentiment_batch(loaded)
    pad = loaded.tokenizer.pad_token_id
    lean = llama_cpu.lean_training_loss(loaded.model)
    grads = []
    for rows in (examples, examples[::-1][:3], examples):  # the middle batch: other shapes
        leaf = kv.detach().clone().requires_grad_(True)
        _backward(loaded.model, leaf, rows, pad, torch.device("cpu"), 10_000, lean)
        grads.append(leaf.grad)
    assert len(lean.workspace.blocks) == 1  # one block, reused
    torch.testing.assert_close(grads[2], grads[0], atol=0, rtol=0)
    lean.close()


@pytest.mark.parametrize("vocab", [64, 67])  # sliced backward, and the plain one
def test_head_cross_entropy_matches_autograd(vocab):
    torch.manual_seed(0)
    h = torch.randn(5, 12, requires_grad=True)
    weight = torch.randn(vocab, 12)
    targets = torch.tensor([0, 3, vocab - 1, 3, 7])
    want = F.cross_entropy(h @ weight.t(), targets)
    (want_grad,) = torch.autograd.grad(want, h)
    got = llama_cpu._HeadCrossEntropy.apply(h, weight, targets)
    (got_grad,) = torch.autograd.grad(got * 1.0, h)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_rope_written_in_place_matches_rotate_half():
    torch.manual_seed(0)
    x, cos, sin = torch.randn(2, 5, 3, 8), torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8)
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    out = torch.empty(2, 3, 5, 8).transpose(1, 2)  # a strided view, as in the attention buffers
    llama_cpu._rope_into(out, x, cos, sin)
    torch.testing.assert_close(out, x * cos + half * sin)
    # the backward is the transpose: <rope(x), g> == <x, rope^T(g)>
    g = torch.randn_like(x)
    back = torch.empty_like(x)
    llama_cpu._rope_backward_into(back, g, cos, sin)
    torch.testing.assert_close((out * g).sum(), (x * back).sum())
