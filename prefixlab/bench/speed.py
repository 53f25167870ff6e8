"""Benchmark: PrefixLab's prefix training and label scoring against Hugging Face PEFT.

`python -m prefixlab.bench.speed` trains a prefix on a fixed, stratified sample of the Davidson
hate/offensive tweets twice: with PrefixLab, and with PEFT's `PrefixTuningConfig` used the way
its documentation shows (`get_peft_model`, a plain torch loop, AdamW on the PEFT parameters,
batches padded to their longest row in random order, labels -100 outside the label tokens).
Both get the same base model, data, prompt template, prefix length and initial prefix, batch
size, max length, learning-rate schedule, gradient clipping, epochs and seed. Held-out texts are
then scored both ways: `score_labels`, and every label's full sequence through PEFT's forward.

Each contender runs in its own child process (`--worker ours|peft`, started without a shell,
one JSON object on stdout), so its peak RSS is its own. The parent measures this machine's
float32 matmul peak (2048^3 products, MKL or oneDNN, whichever is faster) before and after,
prints a table with the targets and by how much each is missed, and ends with one
machine-readable `summary:` line.

PEFT is a benchmark/test-only dependency: only this module imports it, inside the functions
that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.data.labeled import LabeledData, load_labeled_csv
from prefixlab.data.splits import stratified_split
from prefixlab.engine import cpu
from prefixlab.engine.encode import DEFAULT_TEMPLATE, Encoder, Example, Template, bucketed_batches
from prefixlab.engine.models import LoadedModel, autocast
from prefixlab.engine.predict import score_labels
from prefixlab.engine.prefix import Prefix, PrefixConfig, default_init_text, text_key_values
from prefixlab.engine.train import TrainConfig, learning_rate_at, train
from prefixlab.errors import ConfigError
from prefixlab.runs.evaluate import classification_report, predictions_from_probs

DEFAULT_CSV = "davidson_hate_offensive.csv"
CONTENDERS = ("ours", "peft")
VARIANTS = {
    "full": "PrefixLab as shipped",
    "generic": "without the lean Llama step (autograd through the model's own modules)",
    "unbucketed": "without length bucketing (random batches, as PEFT's loader forms them)",
}
QUICK = {"rows": 64, "eval_rows": 60, "epochs": 1}  # --quick: a smoke run of a few minutes
GB = 1e9

# Targets from issue 5; `higher` says which direction meets a target.
TARGETS = {
    "train_speedup": (2.0, "higher"),
    "score_speedup": (2.0, "higher"),
    "flop_utilization": (0.8, "higher"),
    "peak_rss_gb": (1.5, "lower"),
    "label_agreement": (1.0, "higher"),
    "app_start_s": (8.0, "lower"),
}


REPO = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """$PREFIXLAB_SHARED_DATA, else `shared/data` beside the repository (`../shared/data`)."""
    env = os.environ.get("PREFIXLAB_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


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
    """Where both contenders train and score: "cpu" (what the targets are set for) or "cuda",
    where both run under the same bf16 autocast (prefixlab.engine.models.autocast)."""
    threads: int | None = None
    """Pin both contenders to this many CPU threads (OMP_NUM_THREADS, which also switches
    off train()'s thread tuner); None leaves torch's default, and ours its tuner."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("rows", "eval_rows", "epochs", "batch_size", "prefix_length",
                     "score_batch_size", "repeats"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
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


# --- measurement helpers ----------------------------------------------------------------------


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> list[float]:
    """GFLOP/s of `repeats` n^3 products (after one warm-up).

    On CPU float32, each figure the faster of torch's default (MKL) and oneDNN, the library
    ours' lean step multiplies with (prefixlab.engine.cpu.linear): the limit is what the machine
    can do, whichever library does it. On CUDA bf16, the dtype training computes in there, and
    8192^3, the size a GPU needs to reach its peak."""
    dev = torch.device(device)
    if dev.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        dtype = torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    products = [lambda: a @ b]
    if dev.type == "cpu" and cpu.ONEDNN:
        products.append(lambda: cpu.linear(a, b))
    out = []
    for i in range(repeats + 1):
        rates = []
        for product in products:
            _sync(dev)
            start = time.perf_counter()
            product()
            _sync(dev)
            rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
        if i:  # the first is a warm-up
            out.append(max(rates))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_bytes() -> int:
    """Peak CUDA memory torch allocated in this process (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image.

    VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's peak over fork + exec, so a
    worker started from a big parent would report the parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside embedding tables and the LM head (tied or not): what a token's
    forward multiplies by (2 FLOPs each), and its backward to the activations again."""
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip |= {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# --- data -------------------------------------------------------------------------------------


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


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _train_summary(n_examples: int, step_ends: list[float], losses: list[float],
                   real_tokens: int, padded_tokens: int, per_epoch: int, cpu_s: float,
                   threads: list[int]) -> dict:
    """Throughput and loss of one training run; `step_ends` are seconds since it began,
    `threads` the thread count of each step."""
    seconds = step_ends[-1] if step_ends else 0.0
    steps = np.diff([0.0, *step_ends])
    # CPU seconds per wall second per thread, over the threads each step ran
    thread_s = float(np.dot(steps, threads)) if threads else 0.0
    return {
        "steps": len(step_ends),
        "examples": n_examples,
        "seconds": seconds,
        "examples_per_s": n_examples / seconds if seconds else 0.0,
        "tokens_per_s": real_tokens / seconds if seconds else 0.0,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "step_s_median": float(np.median(steps)) if len(steps) else 0.0,
        # CPU seconds per wall second per thread: ~1 when the cores were ours alone, lower when
        # other processes took them (the numbers above are then slower than this machine can do).
        "cpu_share": cpu_s / thread_s if thread_s else 0.0,
        "threads_mean": float(np.mean(threads)) if threads else 0.0,
        "first_loss": float(np.mean(losses[:per_epoch])) if losses else float("nan"),
        "final_loss": float(np.mean(losses[-per_epoch:])) if losses else float("nan"),
    }


# --- ours -------------------------------------------------------------------------------------


def run_ours(loaded: LoadedModel, task: Task, cfg: BenchConfig) -> dict:
    """Train with prefixlab.engine.train and score with score_labels; timings, loss, F1, memory."""
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=cfg.prefix_length))
    prefix.set_key_values(task.init_kv)
    tcfg = cfg.train_config()
    step_ends: list[float] = []
    losses: list[float] = []
    threads: list[int] = []

    def on_step(info) -> None:
        step_ends.append(info.elapsed_s)
        losses.append(info.loss)
        threads.append(torch.get_num_threads())  # what train()'s thread tuner ran this step

    # One speed-up switched off for an ablation row (see VARIANTS); the loss and gradient,
    # and everything else, stay as shipped.
    batch_order = random_batches if cfg.variant == "unbucketed" else bucketed_batches
    # Token counts of the batches train() will form (a pure function of seed and epoch);
    # padded to each batch's longest row, an upper bound: train() pads each chunk to its own.
    lengths = [len(e) for e in task.examples]
    padded = real = 0
    for epoch in range(cfg.epochs):
        for idx in batch_order(lengths, cfg.batch_size, cfg.train_seed, epoch):
            padded += len(idx) * max(lengths[i] for i in idx)
            real += sum(lengths[i] for i in idx)
    cpu = time.process_time()
    train(loaded.model, prefix, task.examples, tcfg, loaded.tokenizer.pad_token_id,
          on_step=on_step, fast_path=cfg.variant != "generic", batch_order=batch_order)
    cpu = time.process_time() - cpu
    per_epoch = -(-len(task.examples) // cfg.batch_size)
    result = {"train": _train_summary(len(task.examples) * cfg.epochs, step_ends, losses, real,
                                      padded, per_epoch, cpu, threads)}
    result["peak_rss_train_bytes"] = peak_rss_bytes()
    result["peak_gpu_train_bytes"] = peak_gpu_bytes()

    kv = prefix.folded()
    texts = task.held_out.texts
    probs, seconds = _timed(lambda: score_labels(loaded.model, kv, task.encoder, texts,
                                                 cfg.score_batch_size))
    preds = predictions_from_probs(probs, task.encoder.labels)
    report = classification_report(task.held_out.labels, preds, task.encoder.labels)
    result["eval"] = {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"]}
    result["score"] = {"examples_per_s": [len(texts) / seconds], "seconds": [seconds]}
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


# --- PEFT -------------------------------------------------------------------------------------


def peft_embeddings(kv: torch.Tensor) -> torch.Tensor:
    """Our kv (L, 2, H_kv, P, D) in PEFT's prompt_embeddings layout (P, L*2*H_kv*D).

    The layout engine.peft_interop writes and reads (row 2l = layer l's keys, 2l+1 values).
    """
    L, _, H, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)  # (P, L*2*H*D)


def peft_key_values(embeddings: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of peft_embeddings: (P, L*2*H*D) -> (L, 2, H_kv, P, D) shaped as `like`."""
    L, _, H, P, D = like.shape
    return embeddings.detach().reshape(P, L, 2, H, D).permute(1, 2, 3, 0, 4).contiguous()


def peft_model(loaded: LoadedModel, kv: torch.Tensor):
    """PEFT's prefix tuning as its docs show it, its prefix initialized to `kv`."""
    from peft import PrefixTuningConfig, get_peft_model

    P = kv.shape[3]
    model = get_peft_model(loaded.model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                           num_virtual_tokens=P))
    embedding = model.prompt_encoder[model.active_adapter].embedding
    with torch.no_grad():
        embedding.weight.copy_(peft_embeddings(kv))
    return model


def _peft_rows(task: Task) -> list[dict]:
    """Tokenized training rows as a PEFT user feeds them: labels -100 except the label tokens."""
    return [
        {"input_ids": e.prompt + e.target, "attention_mask": [1] * len(e),
         "labels": [-100] * len(e.prompt) + e.target}
        for e in task.examples
    ]


def train_peft(loaded: LoadedModel, task: Task, cfg: BenchConfig):
    """PEFT prefix tuning with a plain torch loop; returns (peft model, summary)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    torch.manual_seed(cfg.train_seed)
    model = peft_model(loaded, task.init_kv)
    tcfg = cfg.train_config()
    rows = _peft_rows(task)
    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding="longest",
                                      label_pad_token_id=-100, return_tensors="pt")
    loader = DataLoader(rows, batch_size=cfg.batch_size, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(cfg.train_seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    total = tcfg.total_steps(len(rows))
    # The same warm-up + linear decay as ours, so only the implementation differs.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_at(step, total, tcfg) / cfg.learning_rate)

    step_ends, losses, threads = [], [], []
    real = padded = 0
    model.train()
    device = next(model.parameters()).device
    cpu = time.process_time()
    began = time.perf_counter()
    for _ in range(cfg.epochs):
        for batch in loader:
            with autocast(device):
                out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(out.loss.detach()))
            threads.append(torch.get_num_threads())
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            step_ends.append(time.perf_counter() - began)
    cpu = time.process_time() - cpu
    model.eval()
    return model, _train_summary(len(rows) * cfg.epochs, step_ends, losses, real, padded,
                                 len(loader), cpu, threads)


@torch.no_grad()
def score_peft(model, encoder: Encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Label probabilities (N, K) through PEFT's forward: every (text, label) sequence in full,
    `batch_size` rows per right-padded batch, log p(label tokens) summed per row."""
    prompts = encoder.prompts(texts)
    K = len(encoder.labels)
    rows = [(i, k) for i in range(len(prompts)) for k in range(K)]
    pad = encoder.tokenizer.pad_token_id
    scores = torch.zeros(len(prompts), K, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [prompts[i] + encoder.label_ids[k] for i, k in chunk]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        device = next(model.parameters()).device
        with autocast(device):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, (i, k) in enumerate(chunk):
            n, target = len(prompts[i]), encoder.label_ids[k]
            logp = F.log_softmax(logits[r, n - 1 : n - 1 + len(target)].float(), dim=-1)
            scores[i, k] = float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
    return torch.softmax(scores, dim=-1).numpy()


def run_peft(loaded: LoadedModel, task: Task, cfg: BenchConfig) -> dict:
    """Train and score with PEFT; then score PEFT's trained prefix with score_labels too, timed
    back to back (ours, PEFT, ours), for the scoring speed-up and label agreement."""
    model, summary = train_peft(loaded, task, cfg)
    result = {"train": summary, "peak_rss_train_bytes": peak_rss_bytes(),
              "peak_gpu_train_bytes": peak_gpu_bytes()}
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight
    kv = peft_key_values(embedding, task.init_kv)  # (L, 2, H_kv, P, D)
    texts = task.held_out.texts
    base = model.get_base_model()
    ours_a, ours_s1 = _timed(lambda: score_labels(base, kv, task.encoder, texts,
                                                  cfg.score_batch_size))
    theirs, peft_s = _timed(lambda: score_peft(model, task.encoder, texts, cfg.score_batch_size))
    ours_b, ours_s2 = _timed(lambda: score_labels(base, kv, task.encoder, texts,
                                                  cfg.score_batch_size))
    labels = task.encoder.labels
    preds = predictions_from_probs(theirs, labels)
    report = classification_report(task.held_out.labels, preds, labels)
    result["eval"] = {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"]}
    result["score"] = {"examples_per_s": [len(texts) / peft_s], "seconds": [peft_s]}
    result["ours_score"] = {"examples_per_s": [len(texts) / ours_s1, len(texts) / ours_s2],
                            "seconds": [ours_s1, ours_s2]}
    result["agreement"] = {
        "labels": float(np.mean(ours_a.argmax(1) == theirs.argmax(1))),
        "max_abs_prob_diff": float(np.abs(ours_a - theirs).max()),
    }
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


# --- worker -----------------------------------------------------------------------------------


def run_worker(contender: str, cfg: BenchConfig, loaded: LoadedModel | None = None,
               data: LabeledData | None = None) -> dict:
    """One contender end to end: load model and data, train, score. Returns a JSON-able dict."""
    from prefixlab.engine.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    began = time.perf_counter()
    if loaded is None:
        loaded = load_model(cfg.model, cfg.device)
    load_s = time.perf_counter() - began
    rss_after_load = peak_rss_bytes()
    if data is None:
        data = load_labeled_csv(Path(cfg.data_dir) / cfg.csv)
    task = build_task(loaded, cfg, data)
    run = {"ours": run_ours, "peft": run_peft}[contender]
    result = run(loaded, task, cfg)
    result.update({
        "contender": contender,
        "load_s": load_s,
        "peak_rss_load_bytes": rss_after_load,
        "non_embedding_parameters": non_embedding_parameters(loaded.model),
        "threads": torch.get_num_threads(),
        "train_rows": len(task.train),
        "eval_rows": len(task.held_out),
    })
    return result


def random_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                   shuffle: bool = True) -> list[list[int]]:
    """Batches in random order, no bucketing: what a shuffling DataLoader forms."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def spawn_worker(contender: str, cfg: BenchConfig, timeout: float | None = None) -> dict:
    """Run one contender in a child process (no shell); its last stdout line is the JSON."""
    cmd = [sys.executable, "-m", "prefixlab.bench.speed", "--worker", contender,
           "--config-json", json.dumps(asdict(cfg))]
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"worker {contender!r} exited with {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


# --- report -----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(runs: dict[str, list[dict]], peaks: list[float],
              app_starts: Sequence[float] | None = None) -> dict:
    """Medians across repeats, ratios and the issue's headline numbers."""
    def med(name: str, *path: str) -> float:
        vals = []
        for r in runs[name]:
            v = r
            for p in path:
                v = v[p]
            vals += v if isinstance(v, list) else [v]
        return _median(vals)

    peak = _median(peaks)
    ours_tok = med("ours", "train", "tokens_per_s")
    n_params = runs["ours"][0]["non_embedding_parameters"]
    ours_score = _median(
        [x for r in runs["ours"] for x in r["score"]["examples_per_s"]]
        + [x for r in runs["peft"] for x in r["ours_score"]["examples_per_s"]]
    )
    return {
        "train_speedup": med("ours", "train", "examples_per_s")
        / med("peft", "train", "examples_per_s"),
        "score_speedup": ours_score / med("peft", "score", "examples_per_s"),
        "flop_utilization": 4 * n_params * ours_tok / (peak * 1e9),
        "peak_rss_gb": max(r["peak_rss_train_bytes"] for r in runs["ours"]) / GB,
        "macro_f1_ours": med("ours", "eval", "macro_f1"),
        "macro_f1_peft": med("peft", "eval", "macro_f1"),
        "label_agreement": min(r["agreement"]["labels"] for r in runs["peft"]),
        "app_start_s": app_starts[-1] if app_starts else float("nan"),
        "ours_score_examples_per_s": ours_score,
        "matmul_gflops": peak,
    }


def _miss(name: str, value: float) -> str:
    target, direction = TARGETS[name]
    if value != value:  # NaN
        return "not measured"
    ok = value >= target if direction == "higher" else value <= target
    if ok:
        return "met"
    if direction == "higher":
        return f"MISSED by {target - value:.2f} ({value / target:.0%} of target)"
    return f"MISSED by {value - target:.2f} ({value / target:.0%} of limit)"


def format_report(cfg: BenchConfig, runs: dict[str, list[dict]], peaks: list[float],
                  ablations: dict[str, dict] | None = None,
                  app_starts: Sequence[float] | None = None) -> str:
    """The table, the ratios against targets, and the machine-readable last line."""
    s = summarize(runs, peaks, app_starts)
    cuda = torch.device(cfg.device).type == "cuda"
    peak_label = "bf16 8192^3" if cuda else "float32 2048^3 (faster of MKL and oneDNN)"

    def med(name: str, *path: str) -> float:
        vals = []
        for r in runs[name]:
            v = _dig(r, path)
            vals += v if isinstance(v, list) else [v]
        return _median(vals)

    lines = [
        f"prefixlab.bench.speed: {runs['ours'][0]['train_rows']} train rows, "
        f"{runs['ours'][0]['eval_rows']} held-out rows of {cfg.csv}, epochs {cfg.epochs}, "
        f"batch {cfg.batch_size}, prefix {cfg.prefix_length}, max length {cfg.max_length}, "
        f"lr {cfg.learning_rate}, seed {cfg.seed}, repeats {cfg.repeats}, "
        f"threads {runs['ours'][0]['threads']}, device {cfg.device}",
        f"{peak_label} matmul peak (median of {len(peaks)}): {s['matmul_gflops']:.1f} GFLOP/s "
        f"(range {min(peaks):.1f}-{max(peaks):.1f})",
        *_disturbance_warning(peaks),
        "",
        f"{'training':<28}{'ours':>12}{'peft':>12}{'ratio':>9}",
    ]
    rows = [
        ("examples/s", ("train", "examples_per_s"), "{:.2f}"),
        ("non-padding tokens/s", ("train", "tokens_per_s"), "{:.1f}"),
        ("seconds/step (median)", ("train", "step_s_median"), "{:.3f}"),
        ("train seconds", ("train", "seconds"), "{:.1f}"),
        ("padding share", None, "{:.1%}"),
        ("CPU share (1 = cores ours)", ("train", "cpu_share"), "{:.2f}"),
        ("threads (mean over steps)", ("train", "threads_mean"), "{:.2f}"),
        ("peak RSS, training (GB)", ("peak_rss_train_bytes",), "{:.2f}"),
        ("peak RSS, whole worker (GB)", ("peak_rss_bytes",), "{:.2f}"),
        *([("peak GPU memory, training (GB)", ("peak_gpu_train_bytes",), "{:.2f}")]
          if cuda else []),
        ("first-epoch loss (mean)", ("train", "first_loss"), "{:.4f}"),
        ("final-epoch loss (mean)", ("train", "final_loss"), "{:.4f}"),
        ("held-out macro-F1", ("eval", "macro_f1"), "{:.3f}"),
        ("held-out accuracy", ("eval", "accuracy"), "{:.3f}"),
        ("model load seconds", ("load_s",), "{:.1f}"),
    ]
    for label, path, fmt in rows:
        if path is None:
            vals = [1 - med(n, "train", "real_tokens") / med(n, "train", "padded_tokens")
                    for n in CONTENDERS]
        else:
            vals = [med(n, *path) for n in CONTENDERS]
            if "bytes" in path[-1]:
                vals = [v / GB for v in vals]
        ratio = f"{vals[0] / vals[1]:.2f}x" if vals[1] else "-"
        lines.append(f"{label:<28}{fmt.format(vals[0]):>12}{fmt.format(vals[1]):>12}{ratio:>9}")
    peft_score = med("peft", "score", "examples_per_s")
    agree = runs["peft"][0]["agreement"]
    lines += [
        "",
        f"{'scoring (held-out texts)':<28}{'ours':>12}{'peft':>12}{'ratio':>9}",
        f"{'examples/s':<28}{s['ours_score_examples_per_s']:>12.2f}{peft_score:>12.2f}"
        f"{s['score_speedup']:>8.2f}x",
        f"label agreement (same prefix): {s['label_agreement']:.3f}; "
        f"largest probability difference {agree['max_abs_prob_diff']:.2e}",
        "",
        f"useful-FLOP utilization: 4 x {runs['ours'][0]['non_embedding_parameters'] / 1e6:.1f}M "
        f"non-embedding params x {med('ours', 'train', 'tokens_per_s'):.1f} tokens/s / "
        f"{s['matmul_gflops']:.1f} GFLOP/s = {s['flop_utilization']:.2f} "
        f"(PEFT: {4 * runs['ours'][0]['non_embedding_parameters'] * med('peft', 'train', 'tokens_per_s') / (s['matmul_gflops'] * 1e9):.2f})",  # noqa: E501
    ]
    if ablations:
        lines += ["", *_ablation_table(runs, ablations)]
    if app_starts:
        lines += ["", f"app.py to a served page: {app_starts[0]:.1f} s (first start), "
                      f"{app_starts[-1]:.1f} s (second start, the model already converted)"]
    lines += [
        "",
        f"{'target':<20}{'value':>10}{'goal':>10}  result",
    ]
    for name, (target, direction) in TARGETS.items():
        goal = f"{'>=' if direction == 'higher' else '<='} {target:g}"
        lines.append(f"{name:<20}{s[name]:>10.3f}{goal:>10}  {_miss(name, s[name])}")
    f1_ok = s["macro_f1_ours"] >= s["macro_f1_peft"]
    lines.append(f"{'macro_f1 ours-peft':<20}{s['macro_f1_ours'] - s['macro_f1_peft']:>10.3f}"
                 f"{'>= 0':>10}  "
                 + ("met" if f1_ok else
                    f"MISSED by {s['macro_f1_peft'] - s['macro_f1_ours']:.3f}"))
    lines += ["", summary_line(s)]
    return "\n".join(lines)


DISTURBED = 0.8
"""Slowest matmul peak / median below which something else used the cores during the run."""


def _disturbance_warning(peaks: Sequence[float]) -> list[str]:
    """A warning when the machine's own matmul speed moved during the run: then every figure
    here, the utilization above all (its denominator is the median peak), is suspect."""
    low, mid = min(peaks), _median(peaks)
    if low >= DISTURBED * mid:
        return []
    return [f"WARNING: the matmul peak fell to {low / mid:.0%} of its median during the run: "
            "another process or a noisy neighbour shared the cores, so speeds and the "
            "utilization are unreliable. Run again on an idle machine."]


def _ablation_table(runs: dict[str, list[dict]], ablations: dict[str, dict]) -> list[str]:
    """Ours as shipped against ours with one speed-up off (first repeat's seed) and PEFT."""
    full, peft = runs["ours"][0], runs["peft"][0]
    rows = [("as shipped", full), *((VARIANTS[k], r) for k, r in ablations.items()),
            ("PEFT", peft)]
    base = full["train"]["examples_per_s"]
    lines = [
        "what each speed-up buys (ours, first seed; one switched off per row)",
        f"{'':<74}{'ex/s':>7}{'RSS GB':>8}{'F1':>7}{'shipped/row':>13}",
    ]
    for label, r in rows:
        eps = r["train"]["examples_per_s"]
        lines.append(f"{label:<74}{eps:>7.2f}{r['peak_rss_train_bytes'] / GB:>8.2f}"
                     f"{r['eval']['macro_f1']:>7.3f}{base / eps:>12.2f}x")
    return lines


def _dig(d: dict, path: Sequence[str]):
    for p in path:
        d = d[p]
    return d


def summary_line(s: dict) -> str:
    return (
        f"summary: train_speedup={s['train_speedup']:.2f} score_speedup={s['score_speedup']:.2f} "
        f"flop_utilization={s['flop_utilization']:.2f} peak_rss_gb={s['peak_rss_gb']:.2f} "
        f"macro_f1_ours={s['macro_f1_ours']:.2f} macro_f1_peft={s['macro_f1_peft']:.2f} "
        f"label_agreement={s['label_agreement']:.2f} app_start_s={s['app_start_s']:.1f}"
    )


# --- command line -----------------------------------------------------------------------------


def _app_start_seconds(app: Path, data_dir: Path, model: str | None,
                       timeout: float = 180.0) -> float:
    """Seconds from launching `python app.py` to its page answering 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, str(app), "--port", str(port), "--data-dir", str(data_dir)]
    if model:
        cmd += ["--model", model]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=app.parent)
    try:
        while time.perf_counter() - began < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode} before serving:\n"
                                   + proc.stderr.read()[-2000:])
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - began
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"app.py did not serve {url} within {timeout:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def app_starts(model: str | None, app: Path = REPO / "app.py") -> list[float] | None:
    """Page-served seconds of two app starts in a row, each in a fresh data folder: the first
    may convert the default model; the second finds it converted. None without app.py."""
    if not app.is_file():
        return None
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="prefixlab-bench-app-") as tmp:
            times.append(_app_start_seconds(app, Path(tmp), model))
    return times


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print,
              variants: Sequence[str] = (), app: bool = True) -> str:
    """Matmul peak, the workers interleaved (ours, peft, peft, ours, ...), then ours with one
    speed-up off per variant, then two app starts; the report."""
    peaks = matmul_gflops(device=cfg.device)
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    order = []
    for r in range(cfg.repeats):
        pair = [(name, r) for name in CONTENDERS]
        order += pair if r % 2 == 0 else pair[::-1]
    order += [(f"ours:{v}", 0) for v in variants if v != "full"]
    ablations: dict[str, dict] = {}
    for name, r in order:
        contender, _, variant = name.partition(":")
        began = time.perf_counter()
        result = spawn_worker(contender, replace(cfg, repeat=r, variant=variant or "full"))
        if variant:
            ablations[variant] = result
        else:
            runs[contender].append(result)
        t = result["train"]
        log(f"[{name} seed {cfg.seed + r}] {time.perf_counter() - began:.0f}s: "
            f"{t['examples_per_s']:.2f} ex/s, {t['tokens_per_s']:.1f} tok/s, "
            f"loss {t['final_loss']:.4f}, F1 {result['eval']['macro_f1']:.3f}, "
            f"peak RSS {result['peak_rss_train_bytes'] / GB:.2f} GB")
        peaks += matmul_gflops(repeats=3, device=cfg.device)
    starts = app_starts(cfg.model) if app else None
    if starts:
        log(f"[app] page served after {starts[0]:.1f} s (first start), "
            f"{starts[1]:.1f} s (second)")
    return format_report(cfg, runs, peaks, ablations, starts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prefixlab.bench.speed",
                                description=__doc__.split("\n")[0])
    d = BenchConfig()
    p.add_argument("--data-dir", default=d.data_dir,
                   help="folder with the reference CSVs (default $PREFIXLAB_SHARED_DATA or "
                        "../shared/data beside the repository)")
    p.add_argument("--rows", type=int, default=d.rows, help="training rows")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows, help="held-out rows scored")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--prefix-length", type=int, default=d.prefix_length)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="worker runs per contender, interleaved; medians reported")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default=d.device,
                   help="cpu (the targets are set for it) or cuda; both contenders run there")
    p.add_argument("--threads", type=int, default=None,
                   help="pin both contenders to N CPU threads (switches off ours' thread tuner)")
    p.add_argument("--ablations", action="store_true",
                   help="also train ours with each speed-up switched off (" +
                   "; ".join(f"{k}: {v}" for k, v in VARIANTS.items() if k != "full") + ")")
    p.add_argument("--no-app", action="store_true",
                   help="skip timing two starts of app.py")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 64 train rows, 60 held-out rows, 1 epoch")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.worker:
        cfg = BenchConfig(**json.loads(args.config_json))
        print(json.dumps(run_worker(args.worker, cfg)), flush=True)
        return 0
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    if args.quick:  # shorter defaults; sizes given explicitly still win
        defaults = BenchConfig()
        for name, value in QUICK.items():
            if values[name] == getattr(defaults, name):
                values[name] = value
    cfg = BenchConfig(**values)
    variants = [v for v in VARIANTS if v != "full"] if args.ablations else []
    print(run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True),
                    variants=variants, app=not args.no_app))
    return 0


if __name__ == "__main__":
    sys.exit(main())
