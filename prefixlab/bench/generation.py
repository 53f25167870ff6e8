"""Benchmark of a generation run on the prefix-tuning paper's own task: E2E data-to-text.

`python -m prefixlab.bench.generation` splits `e2e_dev.csv` (shared data) by distinct meaning
representation into train and test inputs, trains a prefix on the training rows with
PrefixLab's loop, then generates every test input greedily and with 5 beams (the paper's
setting), with the prefix and with the bare model under the same template, and prints:

- BLEU, ROUGE-L and chrF (sacrebleu / rouge-score, every reference of an input used), prefix
  vs bare model, beside the published anchors (TGen 65.9, Li & Liang 69.7 BLEU on GPT-2
  Medium with the full E2E training set: E2E's official script, not sacrebleu, and 42k
  training rows, not a few hundred);
- training examples/s and tokens/s;
- generation tokens/s, ours (`decode.py`) against transformers' own `generate` with the same
  prefix passed as a prefilled cache (what PEFT's generate would do, if it did not drop the
  prefix on transformers 5.24), greedy and 5 beams, and whether both give the same outputs;
- the process's peak RSS.

`--speed-only` skips training and scoring and times generation alone (with the prefix's text
initialization, so outputs run to their natural length or the limit).

It measures time: run it on an otherwise idle machine (`flock /work/bench.lock ...` where
several people share one). Each generator is warmed up, then timed `--speed-repeats` times in
alternating order, and its fastest run counts: other processes only ever slow a run down. On
a shared machine note that torch's OpenMP threads spin while they wait: with more threads than
free cores a run can take many times as long (`--threads 1`, or OMP_WAIT_POLICY=PASSIVE).
The last line is a machine-readable `summary: ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prefixlab.bench.machine import default_data_dir, peak_rss_bytes
from prefixlab.data.pairs import group_split, load_pairs_csv, sample_inputs, sample_rows
from prefixlab.engine.decode import DecodeConfig, _left_pad
from prefixlab.engine.encode import DEFAULT_GENERATION_TEMPLATE, PairEncoder, Template
from prefixlab.engine.models import LoadedModel, autocast, load_model
from prefixlab.engine.prefix import Prefix, PrefixConfig, build_cache, cache_keyword, init_prefix
from prefixlab.engine.train import TrainConfig, train
from prefixlab.runs.generation import default_generation_init_text, generate, target_loss
from prefixlab.runs.genmetrics import Grouped, generation_scores, group_references

ANCHORS = {"TGen (E2E challenge baseline)": 65.9,
           "Li & Liang 2021, prefix tuning, GPT-2 Medium": 69.7}


@dataclass
class GenBenchConfig:
    data_dir: str = str(default_data_dir())
    csv: str = "e2e_dev.csv"
    test_share: float = 0.2
    """Share of distinct inputs held out for testing (all their references with them)."""
    train_rows: int | None = 800
    """Training rows sampled from the training inputs (None: all, ~3,700)."""
    test_inputs: int | None = 60
    """Test inputs generated (None: all ~110)."""
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 5e-3
    prefix_length: int = 10
    reparameterize: bool = False
    max_length: int = 160
    max_new_tokens: int = 64
    decode_batch_size: int = 16
    beams: list[int] = field(default_factory=lambda: [1, 5])
    speed_inputs: int = 32
    """Test inputs decoded by both generators for the tokens/s comparison (0: none)."""
    speed_repeats: int = 2
    """Timed runs of each generator (alternating order, after a warm-up); the fastest counts."""
    speed_only: bool = False
    """Skip training and scoring: time generation with the text-initialized prefix."""
    template: str = DEFAULT_GENERATION_TEMPLATE
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:1 ..."""
    seed: int = 0
    model: str | None = None


def hf_generate(model: nn.Module, tokenizer, kv: torch.Tensor | None,
                prompts: Sequence[Sequence[int]], num_beams: int, max_new_tokens: int
                ) -> list[list[int]]:
    """transformers' `generate` after the prefix, passed as a prefilled cache built at
    B * num_beams rows (generate expands inputs and mask to the beams, not a given cache).
    early_stopping="never" is the exact stopping rule decode.beam_search uses, so both do the
    same search and should give the same outputs."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids, mask = _left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    kwargs: dict = {"attention_mask": mask}
    if kv is not None:
        P = kv.shape[3]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(len(prompts), P), mask], 1)
        kwargs[cache_keyword(model)] = build_cache(kv.to(device), len(prompts) * num_beams,
                                                   model)
    with torch.inference_mode(), autocast(device):
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, length_penalty=1.0,
                             early_stopping="never", **kwargs)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        kept = []
        for tok in row:
            if tok == tokenizer.eos_token_id:
                break
            kept.append(tok)
        rows.append(kept)
    return rows


def _timed_decode(fn, prompts: Sequence[Sequence[int]], batch_size: int
                  ) -> tuple[list[list[int]], float, float]:
    """Outputs, seconds and process CPU seconds of decoding `prompts` in batches of similar
    length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        for i, row in zip(idx, fn([prompts[i] for i in idx]), strict=True):
            out[i] = row
    return out, time.perf_counter() - start, time.process_time() - cpu


def speed(loaded: LoadedModel, encoder: PairEncoder, kv: torch.Tensor, inputs: Sequence[str],
          num_beams: int, cfg: GenBenchConfig) -> dict:
    """Generated tokens per second, ours against transformers' generate, same prompts: each
    warmed up on the first batch, then timed `cfg.speed_repeats` times in alternating order;
    the fastest run of each counts (with its CPU seconds)."""
    from prefixlab.engine.decode import generate_ids

    model, tok = loaded.model, loaded.tokenizer
    prompts = encoder.prompts(inputs)
    dc = DecodeConfig(max_new_tokens=cfg.max_new_tokens, num_beams=num_beams,
                      batch_size=cfg.decode_batch_size)
    generators = {
        "ours": lambda rows: generate_ids(model, kv, rows, tok.eos_token_id, tok.pad_token_id,
                                          dc),
        "hf": lambda rows: hf_generate(model, tok, kv, rows, num_beams, cfg.max_new_tokens),
    }
    best: dict[str, tuple[list[list[int]], float, float]] = {}
    for fn in generators.values():  # first-call costs (allocator, lazy imports) left out
        fn(prompts[: cfg.decode_batch_size])
    for r in range(cfg.speed_repeats):
        for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            run = _timed_decode(generators[name], prompts, cfg.decode_batch_size)
            if name not in best or run[1] < best[name][1]:
                best[name] = run
    (ours, ours_s, ours_cpu), (theirs, theirs_s, theirs_cpu) = best["ours"], best["hf"]
    ours_tokens = sum(len(r) for r in ours)
    theirs_tokens = sum(len(r) for r in theirs)
    return {"num_beams": num_beams, "inputs": len(prompts), "repeats": cfg.speed_repeats,
            "threads": torch.get_num_threads(),
            "ours_tokens_per_s": ours_tokens / ours_s, "hf_tokens_per_s": theirs_tokens / theirs_s,
            "ours_s": ours_s, "hf_s": theirs_s, "ours_cpu_s": ours_cpu, "hf_cpu_s": theirs_cpu,
            "same_outputs": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)}


def _speeds(loaded: LoadedModel, encoder: PairEncoder, kv: torch.Tensor, inputs: list[str],
            cfg: GenBenchConfig, log) -> list[dict]:
    if not cfg.speed_inputs:
        return []
    speeds = [speed(loaded, encoder, kv, inputs[: cfg.speed_inputs], b, cfg) for b in cfg.beams]
    for s in speeds:
        log(f"  generation, {s['num_beams']} beam(s): ours {s['ours_tokens_per_s']:.1f} tok/s, "
            f"transformers generate {s['hf_tokens_per_s']:.1f} tok/s, same outputs "
            f"{s['same_outputs']:.0%}")
    return speeds


def run(cfg: GenBenchConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    data = load_pairs_csv(f"{cfg.data_dir}/{cfg.csv}", "input", "target")
    train_pairs, test_pairs = group_split(data, cfg.test_share, cfg.seed)
    train_pairs = sample_rows(train_pairs, cfg.train_rows, cfg.seed)
    test_pairs = sample_inputs(test_pairs, cfg.test_inputs, cfg.seed)
    grouped: Grouped = group_references(test_pairs.inputs, test_pairs.targets)
    log(f"data: {len(train_pairs)} training rows ({train_pairs.distinct_inputs()} inputs), "
        f"{len(grouped)} test inputs with {len(test_pairs)} references")

    started = time.perf_counter()
    loaded = load_model(cfg.model, cfg.device)
    log(f"model {loaded.name} loaded in {time.perf_counter() - started:.1f}s")
    encoder = PairEncoder(loaded.tokenizer, Template(cfg.template), cfg.max_length,
                          cfg.max_new_tokens + 1)
    examples = encoder.examples(train_pairs.inputs, train_pairs.targets)
    prefix = Prefix(loaded.shape, PrefixConfig(prefix_length=cfg.prefix_length,
                                               reparameterize=cfg.reparameterize))
    init_prefix(prefix, loaded.model, loaded.tokenizer, default_generation_init_text(),
                cfg.seed)
    if cfg.speed_only:
        speeds = _speeds(loaded, encoder, prefix.folded().detach(), grouped.inputs, cfg, log)
        return {"config": asdict(cfg), "speed": speeds, "peak_rss_bytes": peak_rss_bytes()}
    tcfg = TrainConfig(learning_rate=cfg.learning_rate, epochs=cfg.epochs,
                       batch_size=cfg.batch_size, checkpoint_every=0, seed=cfg.seed)
    losses: list[float] = []
    last: dict = {}

    def on_step(s) -> None:
        losses.append(s.loss)
        last.update(s.as_dict())
        if s.step % 10 == 0 or s.step == s.total_steps:
            log(f"  step {s.step}/{s.total_steps} loss {s.loss:.3f} "
                f"{s.examples_per_s:.2f} ex/s {s.tokens_per_s:.0f} tok/s")

    train(loaded.model, prefix, examples, tcfg, loaded.tokenizer.pad_token_id, on_step=on_step)
    training = {"steps": last.get("step", 0), "seconds": last.get("elapsed_s", 0.0),
                "examples_per_s": last.get("examples_per_s", 0.0),
                "tokens_per_s": last.get("tokens_per_s", 0.0),
                "first_loss": losses[0] if losses else None,
                "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                "peak_rss_bytes": peak_rss_bytes()}
    kv = prefix.folded()
    test_loss = {"prefix": target_loss(loaded.model, kv, encoder, test_pairs),
                 "bare": target_loss(loaded.model, None, encoder, test_pairs)}
    log(f"trained {training['steps']} steps in {training['seconds']:.0f}s; test target loss "
        f"{test_loss['prefix']:.3f} (bare {test_loss['bare']:.3f})")

    quality = {}
    samples = []
    for beams in cfg.beams:
        dc = DecodeConfig(max_new_tokens=cfg.max_new_tokens, num_beams=beams,
                          batch_size=cfg.decode_batch_size)
        for name, k in (("prefix", kv), ("bare", None)):
            start = time.perf_counter()
            outputs = generate(loaded.model, encoder, k, grouped.inputs, dc)
            scores = generation_scores(outputs, grouped.references)
            scores["seconds"] = time.perf_counter() - start
            quality[f"{name}_beam{beams}"] = scores
            log(f"  {name:<6} beam {beams}: BLEU {scores['bleu']:.1f} ROUGE-L "
                f"{scores['rouge_l']:.1f} chrF {scores['chrf']:.1f} "
                f"({scores['seconds']:.0f}s)")
            if beams == cfg.beams[-1]:
                samples.append(outputs[:3])
    speeds = _speeds(loaded, encoder, kv, grouped.inputs, cfg, log)
    return {"config": asdict(cfg), "training": training, "test_loss": test_loss,
            "quality": quality, "speed": speeds, "peak_rss_bytes": peak_rss_bytes(),
            "examples": [{"input": x, "references": r[:2], "prefix": p, "bare": b}
                         for x, r, p, b in zip(grouped.inputs[:3], grouped.references[:3],
                                               *samples, strict=False)]}


def _speed_lines(result: dict) -> list[str]:
    if not result["speed"]:
        return ["generation speed: not measured (--speed-inputs 0)"]
    lines = [f"{'generation':<12} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6} "
             f"{'CPU-s ratio':>12} {'same outputs':>13}"]
    for s in result["speed"]:
        lines.append(f"{'beam ' + str(s['num_beams']):<12} {s['ours_tokens_per_s']:>11.1f} "
                     f"{s['hf_tokens_per_s']:>15.1f} "
                     f"{s['ours_tokens_per_s'] / s['hf_tokens_per_s']:>6.2f} "
                     f"{s['hf_cpu_s'] / s['ours_cpu_s']:>12.2f} {s['same_outputs']:>13.0%}")
    s = result["speed"][0]
    lines.append(f"({s['inputs']} inputs, fastest of {s['repeats']} runs each, {s['threads']} "
                 "torch threads; CPU-s ratio = generate's CPU seconds / ours)")
    return lines


def format_report(result: dict) -> str:
    cfg = result["config"]
    speedups = {f"gen_speedup_beam{s['num_beams']}": s["ours_tokens_per_s"] / s["hf_tokens_per_s"]
                for s in result["speed"]}
    if "quality" not in result:  # --speed-only
        summary = {**speedups, "peak_rss_gb": result["peak_rss_bytes"] / 1e9}
        return "\n".join(["", *_speed_lines(result),
                          "summary: " + " ".join(f"{k}={v:.3g}" for k, v in summary.items())])
    t, q = result["training"], result["quality"]
    lines = [
        "",
        f"E2E data-to-text ({cfg['csv']}), split by input: {cfg['train_rows'] or 'all'} "
        f"training rows, {q[next(iter(q))]['n']} test inputs; prefix {cfg['prefix_length']} "
        f"tokens{' (reparameterized)' if cfg['reparameterize'] else ''}, {cfg['epochs']} "
        f"epoch(s), lr {cfg['learning_rate']}, batch {cfg['batch_size']}",
        "",
        f"{'decoding':<10} {'':<8} {'BLEU':>6} {'ROUGE-L':>8} {'chrF':>6}",
    ]
    for beams in cfg["beams"]:
        for name in ("prefix", "bare"):
            s = q[f"{name}_beam{beams}"]
            lines.append(f"{'beam ' + str(beams):<10} {name:<8} {s['bleu']:>6.1f} "
                         f"{s['rouge_l']:>8.1f} {s['chrf']:>6.1f}")
    lines += [f"{'anchor':<10} {name}: BLEU {bleu}" for name, bleu in ANCHORS.items()]
    lines += [
        "",
        f"test target loss: prefix {result['test_loss']['prefix']:.3f}, bare model "
        f"{result['test_loss']['bare']:.3f}",
        f"training: {t['steps']} steps in {t['seconds']:.0f}s, {t['examples_per_s']:.2f} "
        f"examples/s, {t['tokens_per_s']:.0f} tokens/s, loss {t['first_loss']:.3f} -> "
        f"{t['last_loss']:.3f}",
        "",
        *_speed_lines(result),
        f"peak RSS: {result['peak_rss_bytes'] / 1e9:.2f} GB (training "
        f"{t['peak_rss_bytes'] / 1e9:.2f} GB)",
    ]
    best = max(cfg["beams"])
    summary = {
        "bleu_prefix": q[f"prefix_beam{best}"]["bleu"], "bleu_bare": q[f"bare_beam{best}"]["bleu"],
        "rouge_l_prefix": q[f"prefix_beam{best}"]["rouge_l"],
        "chrf_prefix": q[f"prefix_beam{best}"]["chrf"],
        "train_examples_per_s": t["examples_per_s"], "train_tokens_per_s": t["tokens_per_s"],
        **speedups,
        "peak_rss_gb": result["peak_rss_bytes"] / 1e9,
    }
    lines.append("summary: " + " ".join(f"{k}={v:.3g}" for k, v in summary.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefixlab.bench.generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = GenBenchConfig()
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--train-rows", type=int, default=d.train_rows,
                   help="training rows (0: all ~3,700)")
    p.add_argument("--test-inputs", type=int, default=d.test_inputs,
                   help="test inputs (0: all ~110)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--prefix-length", type=int, default=d.prefix_length)
    p.add_argument("--reparameterize", action="store_true")
    p.add_argument("--beams", default="1,5", help="comma-separated beam counts")
    p.add_argument("--speed-inputs", type=int, default=d.speed_inputs,
                   help="inputs timed, ours against transformers' generate (0: no timing)")
    p.add_argument("--speed-repeats", type=int, default=d.speed_repeats,
                   help="timed runs of each generator, alternating; the fastest counts")
    p.add_argument("--speed-only", action="store_true",
                   help="no training or scoring: time generation alone")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's own choice, one per core)")
    p.add_argument("--model", help="local folder or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    cfg = GenBenchConfig(
        data_dir=args.data_dir, train_rows=args.train_rows or None,
        test_inputs=args.test_inputs or None, epochs=args.epochs,
        learning_rate=args.learning_rate, prefix_length=args.prefix_length,
        reparameterize=args.reparameterize, beams=[int(b) for b in args.beams.split(",")],
        speed_inputs=args.speed_inputs, speed_repeats=args.speed_repeats,
        speed_only=args.speed_only, model=args.model, device=args.device,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

