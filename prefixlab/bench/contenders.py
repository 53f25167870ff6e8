"""The two contenders of the speed benchmark, each trained and scored on the same `Task`.

- ours: `prefixlab.engine.train` and `score_labels`, as shipped or with one speed-up switched
  off (`VARIANTS`), to show what each one buys;
- peft: Hugging Face PEFT's `PrefixTuningConfig` used the way its documentation shows
  (`get_peft_model`, a plain torch loop, AdamW on the PEFT parameters, batches padded to their
  longest row in random order, labels -100 outside the label tokens), scored with every
  label's full sequence through PEFT's forward; its trained prefix is also scored with
  `score_labels`, for the scoring speed-up and the label agreement.

PEFT is a benchmark/test-only dependency: only this module imports it, inside the functions
that use it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefixlab.bench.machine import peak_gpu_bytes, peak_rss_bytes
from prefixlab.bench.task import BenchConfig, Task
from prefixlab.engine.encode import Encoder, bucketed_batches
from prefixlab.engine.models import LoadedModel, autocast
from prefixlab.engine.predict import score_labels
from prefixlab.engine.prefix import Prefix, PrefixConfig
from prefixlab.engine.train import learning_rate_at, train
from prefixlab.runs.evaluate import classification_report, predictions_from_probs

PEFT_AUTOCAST = {"cuda": torch.bfloat16}
"""PEFT's model is float32 (as its documentation loads it); on a GPU it runs under bf16
autocast, as it would be used there. On a CPU it stays float32."""


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
    if cfg.gen_rows and cfg.variant == "full":  # a variant changes nothing generation runs
        result["generate"] = time_generation(loaded, kv, task.encoder.prompts(texts),
                                             cfg.gen_rows, cfg.gen_tokens)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def time_generation(loaded: LoadedModel, kv: torch.Tensor, prompts: Sequence[Sequence[int]],
                    rows: int, tokens: int) -> dict:
    """Greedy decoding (`decode.generate_ids`) of the first `rows` prompts in one batch after
    the prefix, `tokens` new tokens each: tokens/s. No token id is EOS here (-1), so every
    row runs to `tokens` whatever the model predicts: equal work in every precision. Warmed
    up on one short run first (first-call costs: allocator, lazy imports)."""
    from prefixlab.engine.decode import DecodeConfig, generate_ids

    prompts = list(prompts[:rows])
    pad = loaded.tokenizer.pad_token_id
    generate_ids(loaded.model, kv, prompts[:1], -1, pad, DecodeConfig(max_new_tokens=2))
    config = DecodeConfig(max_new_tokens=tokens, batch_size=max(len(prompts), 1))
    start = time.perf_counter()
    out = generate_ids(loaded.model, kv, prompts, -1, pad, config)
    seconds = time.perf_counter() - start
    made = sum(len(r) for r in out)
    return {"rows": len(prompts), "tokens": made, "seconds": seconds,
            "tokens_per_s": made / seconds if seconds else 0.0}


def random_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                   shuffle: bool = True) -> list[list[int]]:
    """Batches in random order, no bucketing: what a shuffling DataLoader forms."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
            with autocast(device, PEFT_AUTOCAST.get(device.type)):
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
        with autocast(device, PEFT_AUTOCAST.get(device.type)):
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
