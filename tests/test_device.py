"""The device path: training, gradients, scoring, generation, mixed batches and the server's
batcher, knockouts, inspection, checkpoints and data-parallel ranks, on one device.

The device is `PREFIXLAB_TEST_DEVICE` (default: cuda when torch sees a GPU, else cpu), so CI
runs every test here on the CPU on every commit and a GPU machine runs the same file on CUDA
(`scripts/cuda_check.sh`); `pytest -m device` selects them. The tiny random models of
conftest.py keep the file to seconds on one GPU and well under a minute on a quiet CPU.

On CUDA, training and scoring run under bf16 autocast (`models.autocast`), so results are
compared with CPU float32 to bf16 tolerances, not exactly; each tolerance names what it was
measured against. On the CPU the "twin" comparisons compare the CPU with itself and only
check that the path runs and stays finite. Results that never pass through autocast on
either device (a prefix held on the device or on CPU, read by the same model) must agree
exactly or to float32 rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from prefixlab.cli.main import main
from prefixlab.engine.decode import Sampling, mixed_generate
from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.families import family_of
from prefixlab.engine.models import LoadedModel, autocast, pick_device, prepare_model
from prefixlab.engine.predict import generate, score_labels
from prefixlab.engine.prefix import (
    Prefix,
    PrefixConfig,
    init_prefix,
    load_prefix,
    text_key_values,
)
from prefixlab.engine.train import CHUNK_TOKENS, Checkpoint, TrainConfig, _backward, train
from prefixlab.interpret import bank as B
from prefixlab.interpret import knockout as C
from prefixlab.interpret import maps as M
from prefixlab.interpret.attention import attention_maps, prefix_attention
from prefixlab.interpret.frame import KINDS as VECTOR_KINDS
from prefixlab.interpret.frame import key_frame
from prefixlab.interpret.nearest import nearest_tokens
from prefixlab.interpret.values import value_readout
from prefixlab.runs.config import RunConfig
from prefixlab.runs.experiment import execute_run
from prefixlab.runs.finished import open_run
from prefixlab.runs.folder import RunFolder
from prefixlab.serve.batcher import Batcher
from prefixlab.serve.store import PrefixStore
from tests.conftest import make_tokenizer, tiny_model
from tests.test_interpret_causal import _scorer, _signal_in
from tests.test_store import make_prefixes
from tests.test_train import toy_task


def _test_device() -> torch.device:
    named = os.environ.get("PREFIXLAB_TEST_DEVICE")
    if named:
        return torch.device(named)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE = _test_device()
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.fail(f"PREFIXLAB_TEST_DEVICE={DEVICE} but torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})",
                pytrace=False)

pytestmark = pytest.mark.device

CPU = torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"
ROOT = Path(__file__).resolve().parents[1]
KINDS = ["gpt2", "llama"]
TEXT = "the movie was"  # 10 distinct tokens with the test tokenizer (as in test_interpret.py)

# bf16 keeps 8 mantissa bits. Simulating the CUDA path on CPU (bf16 autocast, no lean step)
# against float32 gave gradient cosines >= 0.9996 per layer and kind, gradient norms within
# 0.5%, losses within 0.15% and label probabilities within 0.008. The bounds below leave
# several times that room, and stay far from what a real fault (a lost layer, a dropped
# prefix, a wrong mask) produces.
GRAD_COSINE = 0.99
GRAD_NORM_RTOL = 0.1
LOSS_RTOL = 0.02
PROB_ATOL = 0.03


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """Reference banks go to a fresh folder, never to the user's cache."""
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=KINDS)
def device_loaded(request, tokenizer) -> LoadedModel:
    """conftest's `loaded`, on the device under test."""
    return prepare_model(tiny_model(request.param), tokenizer, f"tiny-{request.param}", DEVICE)


@pytest.fixture(params=KINDS)
def twins(request, tokenizer) -> tuple[LoadedModel, LoadedModel]:
    """The same tiny model on CPU and on the device under test."""
    name = f"tiny-{request.param}"
    cpu = prepare_model(tiny_model(request.param), tokenizer, name, CPU)
    gpu = prepare_model(tiny_model(request.param), tokenizer, name, DEVICE)
    gpu.model.load_state_dict(cpu.model.state_dict())  # tiny_model seeds itself; made sure
    return cpu, gpu


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory) -> Path:
    """A tiny model saved as a local folder, as the CLI and the app load one."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_model(request.param).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def csv_file(tmp_path) -> Path:
    rows = ["text,label"]
    for i in range(30):
        label = ["positive", "negative", "neither"][i % 3]
        rows.append(f"\"the movie was {'great' if i % 3 == 0 else 'bad'} {i}\",{label}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _setup(loaded: LoadedModel, reparameterize: bool = False):
    """test_train.py's toy task, encoder and text-initialized prefix (the prefix on CPU)."""
    texts, labels = toy_task(48)
    enc = Encoder(loaded.tokenizer, Template(), ["negative", "positive"], max_length=64)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=4, reparameterize=reparameterize,
                                               reparam_hidden=16))
    init_prefix(prefix, loaded.model, loaded.tokenizer, "Classify the text")
    return enc, prefix, enc.examples(texts, labels), texts, labels


def _on(device: torch.device, tensors) -> bool:
    return all(t.device.type == device.type for t in tensors)


def _cpu_twin(model_dir: Path) -> LoadedModel:
    """The saved model on CPU, named as a run names it (its folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return prepare_model(AutoModelForCausalLM.from_pretrained(model_dir),
                         AutoTokenizer.from_pretrained(model_dir), str(model_dir), CPU)


# --- device choice ----------------------------------------------------------------------------


def test_pick_device_prefers_cuda_and_honours_a_request():
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == default
    assert pick_device(None).type == default
    assert pick_device(str(DEVICE)).type == DEVICE.type
    assert pick_device("cpu") == CPU
    assert pick_device("cuda:0") == torch.device("cuda", 0)


def test_autocast_is_bf16_on_cuda_and_float32_on_cpu():
    """The premise of every tolerance below: CUDA training and scoring are bf16."""
    x = torch.randn(8, 8, device=DEVICE)
    with autocast(DEVICE):
        assert (x @ x).dtype == (torch.bfloat16 if ON_GPU else torch.float32)
    assert (x @ x).dtype == torch.float32
    with autocast(CPU):  # CPU stays float32: bf16 matmuls are slow there
        assert (x.cpu() @ x.cpu()).dtype == torch.float32


# --- training ---------------------------------------------------------------------------------


def test_training_on_the_device_lowers_loss_and_keeps_the_prefix_there(device_loaded):
    loaded = device_loaded
    enc, prefix, examples, texts, labels = _setup(loaded)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    start = prefix.folded()
    gold = [enc.labels.index(y) for y in labels]
    p_before = score_labels(loaded.model, start, enc, texts)[range(len(texts)), gold].mean()
    losses: list[float] = []
    cfg = TrainConfig(learning_rate=1e-1, epochs=8, batch_size=8, warmup_steps=0)
    train(loaded.model, prefix, examples, cfg, loaded.tokenizer.pad_token_id,
          on_step=lambda s: losses.append(s.loss))
    assert len(losses) == 8 * 6
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    assert _on(DEVICE, prefix.parameters()) and _on(DEVICE, prefix.buffers())
    assert _on(DEVICE, loaded.model.parameters())
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    kv = prefix.folded()  # detached, float32, on CPU
    assert kv.device == CPU and torch.isfinite(kv).all() and not torch.equal(kv, start)
    # As on CPU (test_train.py): the label tokens and their 3:1 balance are learnable.
    p_after = score_labels(loaded.model, kv, enc, texts)[range(len(texts)), gold]
    assert p_after.mean() > max(p_before + 0.05, 0.58)


def test_checkpoints_from_the_device_are_on_cpu_and_resume_there(device_loaded, tmp_path):
    loaded = device_loaded
    cfg = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, warmup_steps=2,
                      checkpoint_every=0)
    for reparam in (False, True):
        enc, prefix, examples, _, _ = _setup(loaded, reparam)
        init = {k: v.clone() for k, v in prefix.state_dict().items()}
        init_kv = prefix.folded()
        train(loaded.model, prefix, examples, cfg, 0)
        full = prefix.folded()

        prefix.load_state_dict(init)
        saved: list[Checkpoint] = []
        asked: list[int] = []

        def stop_after_five(asked=asked) -> bool:
            asked.append(0)
            return len(asked) > 5

        result = train(loaded.model, prefix, examples, cfg, 0,
                       should_stop=stop_after_five, on_checkpoint=saved.append)
        assert result.stopped and result.steps == 5 and saved[-1].step == 5
        tensors = saved[-1].tensors()
        assert any(k.startswith("optimizer.") for k in tensors)  # AdamW's moments come along
        assert _on(CPU, tensors.values()), {k: v.device for k, v in tensors.items()}

        # Through the run folder's file, as a resumed worker reads it.
        folder = RunFolder(tmp_path / f"run-{reparam}")
        folder.path.mkdir()
        folder.save_checkpoint(saved[-1])
        back = folder.load_checkpoint()
        assert back is not None and back.step == 5

        fresh = Prefix(loaded.shape, prefix.config)  # built on CPU; train() moves it
        result = train(loaded.model, fresh, examples, cfg, 0, resume=back)
        assert result.steps == 12 and math.isfinite(result.last_loss)
        assert _on(DEVICE, fresh.parameters()) and _on(DEVICE, fresh.buffers())
        # Exact on CPU (test_train.py). On CUDA, attention backward kernels may add in any
        # order, so allow 2% of the distance trained; a resume that lost AdamW's moments
        # lands 14-22% away.
        moved = (full - init_kv).norm()
        if ON_GPU:
            assert (fresh.folded() - full).norm() < 0.02 * moved
        else:
            torch.testing.assert_close(fresh.folded(), full, rtol=0, atol=1e-6)


def test_prefix_gradient_on_the_device_matches_cpu(twins):
    """One batch's gradient through the prefix key/values, the training step's own path.

    CPU reads a Llama batch through the lean step in float32; CUDA through transformers
    under bf16 autocast. Both must give the same direction per layer and kind.
    """
    cpu, gpu = twins
    texts, labels = toy_task(16)
    enc = Encoder(cpu.tokenizer, Template(), ["negative", "positive"], max_length=64)
    examples = enc.examples(texts, labels)[:8]  # rows of different lengths: padding too
    assert len({len(e) for e in examples}) > 1
    kv = text_key_values(cpu.model, cpu.tokenizer, "Classify the text", 4)
    grads, losses = [], []
    for loaded in (cpu, gpu):
        leaf = kv.detach().clone().to(loaded.device).requires_grad_()
        fast = family_of(loaded.model.config).fast_training_loss(loaded.model)  # as train()
        loss, real, padded = _backward(loaded.model, leaf, examples, 0, loaded.device,
                                       CHUNK_TOKENS, fast)
        assert leaf.grad is not None and leaf.grad.device.type == loaded.device.type
        assert real > 0 and padded > 0
        grads.append(leaf.grad.float().cpu())  # (L, 2, H_kv, P, D)
        losses.append(loss)
    g_cpu, g_gpu = grads
    assert torch.isfinite(g_gpu).all() and math.isfinite(losses[1])
    assert abs(losses[1] - losses[0]) < LOSS_RTOL * losses[0], losses
    for layer in range(kv.shape[0]):
        for kind in range(2):
            a, b = g_cpu[layer, kind].flatten(), g_gpu[layer, kind].flatten()
            cos = float(F.cosine_similarity(a, b, dim=0))
            assert cos > GRAD_COSINE, (layer, kind, cos)
    ratio = float(g_gpu.norm() / g_cpu.norm())
    assert abs(ratio - 1) < GRAD_NORM_RTOL, ratio


# --- scoring and generation -------------------------------------------------------------------


def test_label_scores_on_the_device_match_cpu(twins):
    cpu, gpu = twins
    # A two-token label: scoring continues from the prompt's cache, repeated per label.
    labels = ["positive", "negative sentiment", "neither"]
    enc = Encoder(cpu.tokenizer, Template(), labels, max_length=64)
    assert max(len(ids) for ids in enc.label_ids) > 1
    kv = text_key_values(cpu.model, cpu.tokenizer, "Classify the text", 5)
    texts = ["the movie was great", "bad", "hello world this is fine", "a terrible boring film",
             "good great wonderful excellent", "The quick brown fox jumps over the lazy dog"]
    for prefix_kv in (kv, None):  # with the prefix, and the bare model (zero-shot baseline)
        expected = score_labels(cpu.model, prefix_kv, enc, texts, batch_size=4)
        got = score_labels(gpu.model, prefix_kv, enc, texts, batch_size=4)
        assert got.shape == (len(texts), len(labels)) and np.isfinite(got).all()
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
        np.testing.assert_allclose(got, expected, atol=PROB_ATOL)
        # The same label wherever the CPU's choice is clear of bf16's reach.
        top2 = np.sort(expected, axis=1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * PROB_ATOL
        assert decisive.sum() >= len(texts) // 2
        np.testing.assert_array_equal(got.argmax(1)[decisive], expected.argmax(1)[decisive])
    # A prefix already on the GPU scores exactly as one handed over from CPU.
    np.testing.assert_allclose(score_labels(gpu.model, kv.to(DEVICE), enc, texts, batch_size=4),
                               score_labels(gpu.model, kv, enc, texts, batch_size=4),
                               rtol=0, atol=1e-6)


def test_greedy_sampled_and_beam_generation_on_the_device(device_loaded):
    model, tok = device_loaded.model, device_loaded.tokenizer
    torch.manual_seed(1)
    kv = torch.randn_like(text_key_values(model, tok, "bad awful terrible horrible", 6)) * 4
    prompts = ["the movie", "a terrible boring film was"]  # left padding for the short one
    greedy = generate(model, tok, kv, prompts, max_new_tokens=8)
    assert isinstance(greedy, list) and len(greedy) == len(prompts)
    assert all(isinstance(s, str) for s in greedy) and any(greedy)
    assert generate(model, tok, kv.to(DEVICE), prompts, max_new_tokens=8) == greedy
    bare = generate(model, tok, None, prompts, max_new_tokens=8)
    assert all(isinstance(s, str) for s in bare)
    assert greedy != bare  # the prefix reached the model
    sampled = [generate(model, tok, kv, prompts, max_new_tokens=8, do_sample=True,
                        temperature=0.8, top_p=0.9, seed=3) for _ in range(2)]
    assert all(isinstance(s, str) for s in sampled[0]) and len(sampled[0]) == len(prompts)
    assert sampled[0] == sampled[1]  # seeded
    beams = mixed_generate(model, tok, [kv, kv], prompts, 8, num_beams=3)
    assert all(isinstance(s, str) for s in beams) and len(beams) == len(prompts)
    on_device = kv.to(DEVICE)
    assert mixed_generate(model, tok, [on_device, on_device], prompts, 8, num_beams=3) == beams


def test_mixed_batches_on_the_device_give_each_row_its_text_alone(device_loaded):
    """Rows of different prefixes (and none), greedy and sampled, in one batch: each row's
    text is the one it gets alone (engine.mixed's stacked cache, on the device)."""
    model, tok = device_loaded.model, device_loaded.tokenizer
    kvs = [text_key_values(model, tok, "good great", 4),
           text_key_values(model, tok, "bad awful terrible", 6), None]
    prompts = ["the movie", "a terrible boring film was", "hello"]
    sampling = [None, Sampling(seed=5, temperature=0.9, top_p=0.9), Sampling(seed=7)]
    together = mixed_generate(model, tok, kvs, prompts, [6, 8, 5], sampling)
    for i in range(3):
        alone = mixed_generate(model, tok, [kvs[i]], [prompts[i]], [[6, 8, 5][i]],
                               [sampling[i]])
        assert together[i] == alone[0], i
    assert together[0] == generate(model, tok, kvs[0], [prompts[0]], max_new_tokens=6)[0]


def test_sampling_reads_no_vocabulary_on_the_host(device_loaded, monkeypatch):
    """Tokens are drawn where the logits are: nothing vocabulary-sized is copied to the host
    (it once copied each sampled row's full softmax every token)."""
    model, tok = device_loaded.model, device_loaded.tokenizer
    V = model.config.vocab_size
    copied = []
    for name in ("cpu", "tolist", "numpy", "item"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, real=real, **kwargs):
            copied.append(tuple(self.shape))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    sampling = [Sampling(seed=5, temperature=0.9, top_p=0.9), Sampling(seed=7)]
    texts = mixed_generate(model, tok, [None, None], ["the movie", "hello"], 6, sampling)
    monkeypatch.undo()
    assert len(texts) == 2 and copied  # the drawn token ids are read, as they must be
    assert all(V not in shape for shape in copied), copied


def test_the_servers_batcher_on_the_device(device_loaded, tmp_path):
    """Scoring and generation requests through the server's batcher, answered on the device
    as the same requests are answered one by one."""
    loaded = device_loaded
    keys = make_prefixes(loaded, tmp_path, 2)
    store = PrefixStore(loaded)
    batcher = Batcher(loaded, store, window_s=0.05, max_rows=16)
    texts = ["the movie was great", "a terrible boring film"]
    try:
        for key in keys:
            p = store.get(key)
            scored = batcher.score(key, texts)
            alone = score_labels(loaded.model, p.kv, p.encoder, texts)
            for row, want in zip(scored.probabilities, alone, strict=True):
                assert row == pytest.approx(want, abs=1e-5)
            assert batcher.generate(key, texts, max_new_tokens=4) == generate(
                loaded.model, loaded.tokenizer, p.kv, texts, 4)
    finally:
        batcher.close()


def test_knockout_numbers_on_the_device_match_cpu(twins):
    """test_interpret_causal.py's signal in one slot: ranked first on the device as on CPU,
    every knockout's change within bf16's reach of CPU float32's."""
    cpu, dev = twins
    kv = _signal_in(cpu, slot=2)  # every slot neutral but slot 2
    _, score = _scorer(cpu, kv)  # its six rows, read with kv wherever the model is
    gold = score(cpu.model).argmax(1)  # what the prefix says: its signal slot matters
    results = [C.knockout(loaded, kv, score, gold, replay=True) for loaded in (cpu, dev)]
    ref, got = results
    assert got.ranked("slot")[0][0] == ref.ranked("slot")[0][0] == 2
    # Log-probabilities of a few nats: bf16 rounding moves them by hundredths.
    atol = 0.1 if ON_GPU else 1e-5
    np.testing.assert_allclose(got.slot_log_prob, ref.slot_log_prob, atol=atol)
    np.testing.assert_allclose(got.layer_log_prob, ref.layer_log_prob, atol=atol)
    assert got.all_log_prob == pytest.approx(ref.all_log_prob, abs=atol)


# --- a whole run ------------------------------------------------------------------------------


def test_cli_run_on_the_device_writes_its_files_and_the_prefix_loads_on_cpu(
    tmp_path, csv_file, model_dir, capsys
):
    run = tmp_path / "run"
    code = main(["train", str(csv_file), "--text-column", "text", "--label-column", "label",
                 "--output", str(run), "--model", str(model_dir), "--device", DEVICE.type,
                 "--max-steps", "6", "--batch-size", "4", "--prefix-length", "4",
                 "--max-length", "48", "--eval-every", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"({DEVICE.type})" in err  # "training a 4-token prefix on <model> (cuda): ..."
    for name in ("config.json", "status.json", "prefix.safetensors",
                 "prefix_params.safetensors", "checkpoint.safetensors", "metrics.jsonl",
                 "report.json", "snapshots/step_000000.safetensors",
                 "snapshots/step_000006.safetensors"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["device"] == DEVICE.type
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(s["loss"]) for s in steps)
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and all(math.isfinite(e["val_loss"])
                                                        for e in evals)
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 6 and 0 <= report["accuracy"] <= 1
    assert {"zero_shot", "tfidf"} <= set(report["baselines"])
    # prefix.safetensors holds the kept step: the one validation chose among the evaluated
    # steps (the last unless an earlier one did better), and the snapshot of that step.
    kept = report["kept_step"]
    assert kept in [e["step"] for e in evals] and kept == evals[-1]["best_step"]

    # Back on CPU: the kept prefix, and the full parameterization of the last checkpoint.
    cpu = _cpu_twin(model_dir)
    folder = RunFolder(run)
    saved = load_prefix(run / "prefix.safetensors", cpu.shape)
    assert saved.kv.device == CPU and torch.isfinite(saved.kv).all()
    assert saved.kv.shape[3] == 4 and saved.metadata["base_model"] == str(model_dir)
    assert saved.metadata["step"] == str(kept)
    torch.testing.assert_close(folder.load_snapshot(kept), saved.kv, rtol=0, atol=0)
    params = Prefix(cpu.shape, PrefixConfig(prefix_length=4))
    params.load_state_dict(load_file(run / "prefix_params.safetensors"))
    assert folder.load_checkpoint().step == 6
    torch.testing.assert_close(params.folded(), folder.load_snapshot(6), rtol=0, atol=0)

    # The CLI predicts on the run's device; the same prefix on CPU agrees.
    texts = ["the movie was great", "the movie was bad 4"]
    assert main(["predict", str(run), "--text", texts[0], "--text", texts[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    on_cpu = open_run(run, cpu)
    probs = on_cpu.score(texts)
    assert [line["text"] for line in lines] == texts
    for line, row in zip(lines, probs, strict=True):
        got = [line["probabilities"][label] for label in on_cpu.labels]
        np.testing.assert_allclose(got, row, atol=PROB_ATOL)

    assert main(["predict", str(run), "--text", "the movie", "--generate",
                 "--max-new-tokens", "5"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["text"] == "the movie" and isinstance(generated["generated"], str)

    assert main(["inspect", str(run), "--output", str(tmp_path / "insp"), "--bank-size",
                 "100", "--text", "the movie"]) == 0
    for name in ("nearest_tokens.json", "pca.json", "inspection.html"):
        assert (tmp_path / "insp" / name).is_file(), name


def test_workbench_compares_and_generates_with_a_run_trained_on_the_device(
    tmp_path, csv_file, model_dir, monkeypatch
):
    """The app's path: the model on the default device, a run, prefix-vs-bare comparison."""
    from prefixlab.workbench import Workbench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: ON_GPU)  # the default: DEVICE
    bench = Workbench(tmp_path / "data", model=str(model_dir))
    loaded = bench.model()
    assert loaded.device.type == DEVICE.type  # no device named: CUDA when present
    cfg = RunConfig(
        train_csv=str(csv_file), text_column="text", label_column="label",
        model=str(model_dir), max_length=48, prefix=PrefixConfig(prefix_length=4),
        training=TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-2),
    )
    run_id = bench.store.create(cfg, loaded, name="gpu")
    report = execute_run(bench.store.folder(run_id), loaded)  # the worker's body, in-process
    assert report is not None and report["steps"] == 4
    texts = ["the movie was great", "the movie was bad 4"]
    table = bench.compare(texts, [run_id])
    assert len(table) == 2 * len(texts)
    assert set(table["source"]) == {"prefix: gpu", "bare model (zero-shot)"}
    labels = bench.open(run_id).labels
    probs = table[[f"p({label})" for label in labels]].to_numpy(dtype=float)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)  # rounded to 4 places
    assert set(table["predicted"]) <= set(labels)
    for run in (run_id, None):  # with the run's prefix, and the bare default model
        assert isinstance(bench.generate("the movie", run, max_new_tokens=5), str)


# --- looking inside ---------------------------------------------------------------------------


def test_inspection_of_a_text_prefix_held_on_the_device(device_loaded):
    """test_interpret.py's exact frame check on CUDA, and the same results for a prefix held
    on the GPU as for its CPU copy."""
    loaded = device_loaded
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    P = len(ids) + 3  # the text repeats to fill P
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, P)  # (L, 2, H_kv, P, D) on CPU
    gpu_kv = kv.to(DEVICE)
    bank = B.reference_bank(loaded, 2000, extra_ids=ids)

    nearest = nearest_tokens(loaded, gpu_kv, bank, top_k=5)
    L = loaded.shape.num_layers
    expected = np.broadcast_to(np.array((ids * 2)[:P]), (L, 2, P))
    np.testing.assert_array_equal(nearest.token_ids[..., 0], expected)
    # float32 on both sides, but a full read and a cached one-token read use different
    # kernels on the GPU: 0.999 where CPU gets 0.9999.
    assert nearest.scores[..., 0].min() > 0.999
    assert (nearest.margin > 0.2).all()
    from_cpu = nearest_tokens(loaded, kv, bank, top_k=5)
    np.testing.assert_array_equal(nearest.token_ids, from_cpu.token_ids)
    np.testing.assert_allclose(nearest.scores, from_cpu.scores, rtol=0, atol=1e-6)

    framed = key_frame(loaded, gpu_kv)
    assert framed.device.type == DEVICE.type
    torch.testing.assert_close(key_frame(loaded, framed, inverse=True), gpu_kv,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(framed.cpu(), key_frame(loaded, kv), atol=1e-6, rtol=1e-6)

    readout = value_readout(loaded, gpu_kv, top_k=5)
    np.testing.assert_array_equal(readout.token_ids, value_readout(loaded, kv, 5).token_ids)

    layer = L - 1
    both = {"gpu": gpu_kv, "cpu": kv}
    for kind in VECTOR_KINDS:
        m = M.pca_map(loaded, bank, both, layer, kind)
        np.testing.assert_allclose(m.prefixes["gpu"], m.prefixes["cpu"], atol=1e-5)
        np.testing.assert_allclose(M.layers_map(loaded, bank, gpu_kv, kind).coords,
                                   M.layers_map(loaded, bank, kv, kind).coords, atol=1e-5)

    text = "a terrible boring film"
    maps = attention_maps(loaded, gpu_kv, text)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps, attention_maps(loaded, kv, text), atol=1e-6)
    mass = prefix_attention(loaded, both, [text, "this is fine"])
    np.testing.assert_allclose(mass.mass[0], mass.mass[1], atol=1e-6)

    similarity = M.compare_prefixes(both).similarity  # (L, 2, 2)
    np.testing.assert_allclose(similarity, 1.0, atol=1e-5)


def test_inspection_of_a_prefix_trained_on_the_device(device_loaded):
    """A reparameterized prefix straight from training: on the GPU, with a graph behind it."""
    loaded = device_loaded
    enc, prefix, examples, _, _ = _setup(loaded, reparameterize=True)
    init_kv = prefix.folded()
    train(loaded.model, prefix, examples[:16], TrainConfig(max_steps=2, batch_size=8), 0)
    live = prefix.key_values()  # (L, 2, H_kv, P, D)
    assert live.device.type == DEVICE.type and live.requires_grad
    kv = prefix.folded()  # its CPU copy

    bank = B.reference_bank(loaded, 200, extra_ids=B.label_token_ids(loaded.tokenizer,
                                                                       enc.labels))
    nearest = nearest_tokens(loaded, live, bank, top_k=3)
    np.testing.assert_array_equal(nearest.token_ids, nearest_tokens(loaded, kv, bank,
                                                                       top_k=3).token_ids)
    assert np.isfinite(nearest.scores).all() and np.isfinite(nearest.baseline).all()
    readout = value_readout(loaded, live, top_k=3)
    np.testing.assert_array_equal(readout.token_ids, value_readout(loaded, kv, 3).token_ids)
    assert key_frame(loaded, live).shape == live.shape
    named = {"trained": live, "start": init_kv}
    m = M.pca_map(loaded, bank, named, loaded.shape.num_layers - 1, "value")
    assert set(m.prefixes) == {"trained", "start"} and np.isfinite(m.prefixes["trained"]).all()
    assert np.isfinite(M.layers_map(loaded, bank, live, "key").coords).all()
    mass = prefix_attention(loaded, named, ["a terrible boring film"])
    assert ((mass.mass >= 0) & (mass.mass <= 1)).all()
    similarity = M.compare_prefixes(named).similarity
    np.testing.assert_allclose(np.diagonal(similarity, axis1=1, axis2=2), 1.0, atol=1e-5)


def test_prefix_movement_accepts_snapshots_held_on_the_device():
    """Snapshots held on CUDA (e.g. a live prefix's key_values()) are read on CPU."""
    kv0 = torch.randn(2, 2, 2, 4, 8)
    result = M.prefix_movement([(0, kv0.to(DEVICE)), (5, (kv0 * 1.5).to(DEVICE))])
    np.testing.assert_allclose(result.distance[1], 0.5, rtol=1e-5)


# --- data-parallel ranks ----------------------------------------------------------------------


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    texts, labels = toy_task(33, seed=1)  # 26 train rows
    path = tmp_path / "toy.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels,
                                                                             strict=True)))
    return path


def test_ranks_train_the_prefix_one_process_trains(tmp_path, toy_csv):
    """Two ranks started by plain torchrun against one process: NCCL with one rank per GPU
    where there are two GPUs (one NCCL rank on a single GPU: its device binding and the
    gathered validation still run), gloo with two ranks on the CPU. Batch 5 over 2 ranks
    gives 2 + 3 rows, and an epoch's last batch of 1 row leaves rank 0 an empty share."""
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    n = min(2, torch.cuda.device_count()) if ON_GPU else 2
    common = [str(toy_csv), "--model", str(model_dir), "--device", DEVICE.type, "--seed", "3",
              "--prefix-length", "4", "--batch-size", "5", "--max-length", "48",
              "--epochs", "2", "--learning-rate", "0.01"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(n), "-m", "prefixlab", "train", *common, "--output",
                           str(tmp_path / "ranks")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *common, "--output", str(tmp_path / "one"), "--nproc", "1"]) == 0
    ranks, one = RunFolder(tmp_path / "ranks"), RunFolder(tmp_path / "one")
    assert ranks.status()["processes"] == n and ranks.status()["state"] == "completed"
    records = [json.loads(x) for x in ranks.metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 13))  # written once each: rank 0 alone writes
    a, b = load_file(ranks.params_path), load_file(one.params_path)
    # bf16 on both sides on CUDA (the bf16-vs-float32 tolerance); float32 sums in another
    # order on CPU.
    atol, rtol = (0.03, 0.05) if ON_GPU else (2e-5, 1e-4)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol)
