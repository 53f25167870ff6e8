"""The compute dtype (engine/precision.py): chosen per ISA, and bfloat16 agreeing with float32.

Tolerances, bfloat16 vs float32 on the tiny models (hidden 32, 2 layers, random weights):
bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.002 per operation), and a
forward pass rounds every matmul's inputs. Measured gaps are well inside the bounds below:
- loss: within 2% relative;
- prefix gradient: cosine similarity above 0.99 and norm within 5%;
- label log-probabilities: within 0.1 nats. They are taken in float32 from the logits, but
  the logits leave the bf16 model rounded to bf16 (spacing 2^-7·|logit|: ~0.06 at 10);
- greedy generation: the same tokens (for a few steps, from a prompt whose next token leads
  by a clear margin in float32).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prefixlab.engine import precision
from prefixlab.engine.encode import collate
from prefixlab.engine.models import cast_parameters, load_model, prepare_model
from prefixlab.engine.precision import resolve_precision
from prefixlab.engine.predict import generate, score_log_likelihoods
from prefixlab.engine.prefix import Prefix
from prefixlab.engine.train import Checkpoint, TrainConfig, _backward, batch_loss, train
from prefixlab.errors import ConfigError

from .conftest import TEXTS, loss_and_grad, sentiment_batch, tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(("isa", "auto"), [("AMX", "bfloat16"), ("AVX512-BF16", "bfloat16"),
                                           ("none", "float32")])
def test_auto_takes_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch, isa, auto):
    monkeypatch.setattr(precision, "CPU_AUTO_BF16", True)  # once measured on such a CPU
    monkeypatch.setattr(precision, "cpu_isa", lambda: isa)
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == auto and chosen.dtype == precision.DTYPES[auto]
    assert (isa in chosen.reason) == (isa != "none")
    for asked in ("float32", "bfloat16"):  # an explicit choice wins on any CPU
        assert resolve_precision(asked, CPU).name == asked
    with pytest.raises(ConfigError, match="float16 runs on CUDA only"):
        resolve_precision("float16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("half", CPU)


@pytest.mark.parametrize("isa", ["AMX", "AVX512-BF16"])
def test_auto_stays_float32_on_a_cpu_until_bfloat16_quality_is_measured(monkeypatch, isa):
    monkeypatch.setattr(precision, "cpu_isa", lambda: isa)
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "float32" and "not yet measured" in chosen.reason
    assert resolve_precision("bfloat16", CPU).name == "bfloat16"


def test_native_bf16_follows_the_probe(monkeypatch):
    from prefixlab.engine.cpu import native_bf16

    monkeypatch.setattr(precision, "cpu_isa", lambda: "AMX")
    assert native_bf16(CPU)
    monkeypatch.setattr(precision, "cpu_isa", lambda: "none")
    assert not native_bf16(CPU)


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no name to ask for
    assert resolve_precision("auto", "cuda").name == "bfloat16"
    assert resolve_precision("float16", "cuda").name == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda").name == "float32"
    with pytest.raises(ConfigError, match="does not support"):
        resolve_precision("bfloat16", "cuda")


@pytest.fixture(params=["gpt2", "llama"])
def pair(request, tokenizer):
    """The same tiny model twice: float32, and its weights held in bfloat16."""
    model = tiny_model(request.param)
    f32 = prepare_model(model, tokenizer, f"tiny-{request.param}", CPU)
    bf16 = prepare_model(copy.deepcopy(model), tokenizer, f"tiny-{request.param}", CPU,
                         torch.bfloat16)
    return f32, bf16


def test_weights_are_held_once_in_the_compute_dtype(pair):
    _, bf16 = pair
    assert bf16.dtype == torch.bfloat16 and bf16.precision == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    # RoPE's frequencies (Llama) stay float32: buffers are not weights
    assert all(b.dtype != torch.bfloat16 for b in bf16.model.buffers())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_bfloat16_loss_and_prefix_gradient_agree_with_float32(pair):
    f32, bf16 = pair
    examples, kv = sentiment_batch(f32)
    batch = collate(examples, f32.tokenizer.pad_token_id)
    want_loss, want_grad = loss_and_grad(batch_loss, f32.model, kv.detach().requires_grad_(),
                                         batch)
    # the master prefix is float32; _backward casts it once and hands back a float32 gradient
    leaf = kv.detach().clone().requires_grad_(True)
    longest = max(len(e) for e in examples)
    loss, _, _ = _backward(bf16.model, leaf, examples, bf16.tokenizer.pad_token_id, CPU,
                           2 * longest)  # three chunks: their gradients add up in float32
    assert leaf.grad is not None and leaf.grad.dtype == torch.float32
    assert loss == pytest.approx(float(want_loss), rel=0.02)
    assert _cosine(leaf.grad, want_grad) > 0.99
    assert float(leaf.grad.norm()) == pytest.approx(float(want_grad.norm()), rel=0.05)


def test_bfloat16_label_scores_agree_with_float32(pair):
    from prefixlab.engine.encode import Encoder, Template

    f32, bf16 = pair
    _, kv = sentiment_batch(f32)
    encoder = Encoder(f32.tokenizer, Template(), ["negative", "positive", "neither hate"], 64)
    want = score_log_likelihoods(f32.model, kv.detach(), encoder, TEXTS)
    got = score_log_likelihoods(bf16.model, kv.detach(), encoder, TEXTS)
    assert got.dtype == want.dtype
    assert abs(got - want).max() < 0.1


def test_bfloat16_greedy_generation_agrees_with_float32(pair):
    f32, bf16 = pair
    _, kv = sentiment_batch(f32)
    prompts = ["the movie was", "good great"]
    want = generate(f32.model, f32.tokenizer, kv.detach(), prompts, max_new_tokens=3)
    got = generate(bf16.model, bf16.tokenizer, kv.detach(), prompts, max_new_tokens=3)
    assert got == want


def test_a_bfloat16_run_resumes_exactly_from_its_checkpoint(tokenizer):
    from .test_train import _setup

    loaded = prepare_model(tiny_model("llama"), tokenizer, "tiny-llama", CPU, torch.bfloat16)
    cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, warmup_steps=2,
                      checkpoint_every=0)
    _, prefix, examples, _, _ = _setup(loaded)
    assert prefix.kv.dtype == torch.float32  # master weights
    init = {k: v.clone() for k, v in prefix.state_dict().items()}
    train(loaded.model, prefix, examples, cfg, 0)
    full = prefix.folded()
    prefix.load_state_dict(init)
    saved: list[Checkpoint] = []
    asked: list[int] = []
    result = train(loaded.model, prefix, examples, cfg, 0,
                   should_stop=lambda: asked.append(0) or len(asked) > 5,
                   on_checkpoint=saved.append)
    assert result.steps == 5
    assert all(v.dtype == torch.float32 for v in saved[-1].tensors().values()
               if v.is_floating_point())
    fresh = Prefix(loaded.shape, prefix.config)
    train(loaded.model, fresh, examples, cfg, 0, resume=saved[-1])
    assert torch.equal(fresh.folded(), full)  # bit for bit: same casts, same order


def test_cast_parameters_leaves_integer_and_buffer_state(tokenizer):
    model = tiny_model("llama")
    cast_parameters(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_run_records_the_precision_auto_chose_and_reopens_in_it(tmp_path, model_dir,
                                                                   monkeypatch):
    from prefixlab.engine.prefix import PrefixConfig
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.experiment import create_run, execute_run, prepare_data
    from prefixlab.runs.finished import open_run
    from prefixlab.runs.folder import RunFolder

    monkeypatch.setattr(precision, "CPU_AUTO_BF16", True)
    monkeypatch.setattr(precision, "cpu_isa", lambda: "AMX")
    rows = ["text,label"] + [f"the movie was {'great' if i % 2 else 'bad'} {i},"
                             f"{'positive' if i % 2 else 'negative'}" for i in range(24)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig(train_csv=str(tmp_path / "data.csv"), model=str(model_dir), device="cpu",
                    max_length=48, prefix=PrefixConfig(prefix_length=4),
                    training=TrainConfig(epochs=1, batch_size=8, patience=0))
    assert cfg.precision == "auto"
    prepared = prepare_data(cfg)
    loaded = load_model(str(model_dir), "cpu")  # auto, on a CPU said to have AMX
    assert loaded.dtype == torch.bfloat16
    folder = create_run(cfg, tmp_path / "run", prepared, loaded)
    info = folder.read_config()
    assert info["run"]["precision"] == "bfloat16"  # what auto chose, not "auto"
    assert info["precision"] == {"used": "bfloat16", "requested": "auto",
                                 "reason": "the CPU multiplies bfloat16 natively (AMX)"}
    report = execute_run(folder, loaded, prepared=prepared)
    assert report is not None and report["precision"] == "bfloat16"
    monkeypatch.setattr(precision, "cpu_isa", lambda: "none")  # auto would say float32 now
    assert open_run(tmp_path / "run").loaded.dtype == torch.bfloat16  # the run's own

    # a run folder from before precisions existed trained in float32, and reopens in it
    del info["run"]["precision"]
    RunFolder(tmp_path / "run").write_config(info)
    assert RunFolder(tmp_path / "run").run_config().precision == "float32"
