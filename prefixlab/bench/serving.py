"""Benchmark: serving many prefixes with one model.

`python -m prefixlab.bench.serving` makes N prefixes (default 64) on the default model, each
initialized from a different text (the key/values of that text, so they differ as trained
prefixes do), writes them as run folders and as PEFT adapters, and replays R requests (default
512), each naming a random prefix with 1-3 short texts to classify, from C concurrent clients
(a closed loop: each client sends its next request when the last is answered). It reports
requests/s and p50/p95 latency for:

- mixed: PrefixLab's batcher, requests for any prefixes in one mixed batch;
- shared: the same batcher and requests, every request naming one prefix (the ceiling);
- one-at-a-time: PrefixLab scoring each request alone with its own prefix;
- peft: PEFT with every prefix loaded as a named adapter, `set_adapter` per request, on the
  model as transformers ships it;
- peft-onednn: the same on PrefixLab's model, whose linear layers multiply through oneDNN
  (prefixlab.engine.cpu.onednn_inference): what batching gains with the matmul kernels held equal.

Then a sweep: mixed and peft side by side for several client counts (default 1, 4, 16, 32)
on the first `--sweep-requests` requests: throughput grows with load only where requests
share batches. It also reports the first-load latency of a prefix from disk (run folder into
the store, its template head read once) and the memory each resident prefix takes. Targets
(issue 16): mixed >= 5x peft throughput and >= 0.8x shared. One `summary:` line ends the
output. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefixlab.bench.contenders import PEFT_AUTOCAST
from prefixlab.engine.cpu import onednn_inference
from prefixlab.engine.mixed import mixed_score_labels
from prefixlab.engine.models import DEFAULT_MODEL, LoadedModel, autocast, load_model
from prefixlab.engine.prefix import PrefixConfig, save_prefix, text_key_values
from prefixlab.files import atomic_write_json
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.serve.batcher import Batcher
from prefixlab.serve.store import PrefixStore

LABELS = ["positive", "negative", "neutral"]
TOPICS = ["films", "restaurants", "phones", "hotels", "books", "games", "cars", "airlines",
          "shoes", "laptops", "concerts", "museums"]
STYLES = ["Classify the sentiment of reviews about {t}.", "Is this {t} review good or bad?",
          "Read the customer's words on {t} and judge them.", "Tweets about {t}: mood?",
          "You rate {t} feedback as positive, negative or neutral."]
TEXTS = ["great value, would buy again", "terrible, it broke after a day", "it was okay",
         "absolutely loved it", "never again", "fine, nothing special", "the staff were rude",
         "best purchase this year", "arrived late and damaged", "does what it says",
         "I want my money back", "a pleasant surprise", "meh", "five stars, perfect",
         "slow and overpriced", "good but noisy"]
TARGETS = {"mixed_vs_peft": 5.0, "mixed_vs_shared": 0.8}


@dataclass
class ModeResult:
    name: str
    seconds: float
    latencies: list[float]

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000)


def make_prefixes(loaded: LoadedModel, root: Path, n: int, length: int) -> list[str]:
    """n completed run folders (config.json + prefix.safetensors + status.json), each from a
    different text."""
    keys = []
    for i in range(n):
        text = STYLES[i % len(STYLES)].format(t=TOPICS[(i // len(STYLES)) % len(TOPICS)])
        text += f" Case {i}."
        kv = text_key_values(loaded.model, loaded.tokenizer, text, length)
        folder = root / f"prefix{i:03d}"
        folder.mkdir(parents=True)
        cfg = RunConfig(train_csv="", model=loaded.name, max_length=96,
                        prefix=PrefixConfig(prefix_length=length))
        atomic_write_json(folder / "config.json", {"format": "prefixlab-run/1",
                                                   "name": folder.name, "run": cfg.to_dict(),
                                                   "labels": LABELS})
        save_prefix(folder / "prefix.safetensors", kv, loaded.name)
        RunFolder(folder).set_status("completed")  # only a completed run's prefix is served
        keys.append(str(folder))
    return keys


def make_requests(keys: list[str], n: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    return [(rng.choice(keys), rng.sample(TEXTS, rng.randint(1, 3))) for _ in range(n)]


def replay(name: str, requests: list[tuple[str, list[str]]], clients: int,
           serve: Callable[[str, list[str]], object]) -> ModeResult:
    """Closed loop: `clients` threads send the requests in order, one at a time each."""
    latencies = [0.0] * len(requests)
    cursor = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            start = time.perf_counter()
            serve(*requests[i])
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ModeResult(name, time.perf_counter() - start, latencies)


class OneAtATime:
    """PrefixLab without mixing: each request alone, under its own prefix."""

    def __init__(self, loaded: LoadedModel, store: PrefixStore) -> None:
        self.loaded, self.store, self.lock = loaded, store, threading.Lock()

    def __call__(self, key: str, texts: list[str]) -> list[np.ndarray]:
        with self.lock:
            p = self.store.get(key)
            return mixed_score_labels(self.loaded.model, [p.score_item(t) for t in texts])


class PeftSwitching:
    """PEFT: every prefix a named adapter of one PeftModel, `set_adapter` per request."""

    def __init__(self, loaded: LoadedModel, store: PrefixStore, keys: list[str], root: Path
                 ) -> None:
        """`loaded`: the model PEFT wraps (adapters are written under `root` once)."""
        from peft import PeftModel

        from prefixlab.engine.models import model_source
        from prefixlab.engine.peft_interop import export_peft

        self.loaded, self.lock = loaded, threading.Lock()
        self.encoder = store.get(keys[0]).encoder  # every prefix shares template and labels
        if any(len(t) > 1 for t in self.encoder.label_ids):  # it reads first tokens alone
            raise ValueError(f"the PEFT contender scores one-token labels only; "
                             f"{self.encoder.labels} are not all one token for this model")
        self.names: dict[str, str] = {}
        self.load_s: list[float] = []
        model = None
        for i, key in enumerate(keys):
            folder = root / f"adapter{i:03d}"
            if not folder.is_dir():
                export_peft(store.get(key).kv, loaded.model.config, folder,
                            model_source(loaded.name))
            name = f"p{i}"
            start = time.perf_counter()
            if model is None:
                model = PeftModel.from_pretrained(loaded.model, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
            self.load_s.append(time.perf_counter() - start)
            self.names[key] = name
        model.eval()
        self.model = model

    def __call__(self, key: str, texts: list[str]) -> list[np.ndarray]:
        tok = self.loaded.tokenizer
        rows = self.encoder.prompts(texts)
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: PEFT's default positions stay right
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        device = self.loaded.device
        ids, mask = ids.to(device), mask.to(device)
        first = torch.tensor([t[0] for t in self.encoder.label_ids], device=device)
        peft_dtype = PEFT_AUTOCAST.get(device.type)
        with self.lock, torch.inference_mode(), autocast(device, peft_dtype):
            self.model.set_adapter(self.names[key])
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        last = logits[torch.arange(len(rows), device=device), mask.sum(1) - 1]  # (B, V)
        probs = torch.softmax(torch.log_softmax(last.float(), -1)[:, first], -1)
        return list(probs.cpu().numpy())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def replay_modes(modes: dict[str, tuple[list, Callable]], clients: int, rounds: int
                 ) -> dict[str, ModeResult]:
    """Modes take turns on `rounds` slices of their requests, so a change in the machine's
    load (other processes) falls on every mode alike rather than on whichever ran then."""
    results = {name: ModeResult(name, 0.0, []) for name in modes}
    n = len(next(iter(modes.values()))[0])
    size = -(-n // rounds)
    for start in range(0, n, size):
        for name, (reqs, serve) in modes.items():
            part = replay(name, reqs[start:start + size], clients, serve)
            results[name].seconds += part.seconds
            results[name].latencies += part.latencies
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefixlab.bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--prefixes", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prefix-length", type=int, default=10)
    p.add_argument("--window-ms", type=float, default=5.0)
    p.add_argument("--max-rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8,
                   help="modes take turns on this many slices of the requests")
    p.add_argument("--sweep", default="1,4,16,32",
                   help="client counts for the mixed vs peft sweep (empty: no sweep)")
    p.add_argument("--sweep-requests", type=int, default=128,
                   help="requests replayed at each client count of the sweep")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT contenders")
    args = p.parse_args(argv)
    try:
        sweep = [int(c) for c in args.sweep.split(",") if c.strip()]
    except ValueError:
        p.error(f"--sweep takes client counts separated by commas, got {args.sweep!r}")
    if any(c < 1 for c in sweep):
        p.error(f"--sweep client counts must be >= 1, got {args.sweep!r}")
    torch.manual_seed(args.seed)

    loaded = load_model(args.model, args.device)
    print(f"model {loaded.name} on {loaded.device}, {torch.get_num_threads()} threads; "
          f"{args.prefixes} prefixes of {args.prefix_length} tokens, {args.requests} requests "
          f"of 1-3 texts, {args.clients} clients, window {args.window_ms} ms, "
          f"max {args.max_rows} rows")
    with tempfile.TemporaryDirectory(prefix="prefixlab-bench-serve-") as tmp:
        root = Path(tmp)
        keys = make_prefixes(loaded, root / "runs", args.prefixes, args.prefix_length)
        store = PrefixStore(loaded)
        before = rss_mb()
        firsts = [store.get(k) for k in keys]  # first loads, from disk
        loads = [f.load_s for f in firsts]
        heads = [f.head_s for f in firsts]
        after = rss_mb()
        first = store.get(keys[0])
        held_mb, kv_mb = first.nbytes / 2**20, first.kv.numel() * 4 / 2**20
        requests = make_requests(keys, args.requests, args.seed)
        shared = [(keys[0], texts) for _, texts in requests]

        # Warm-up: first forwards allocate and pick kernels.
        OneAtATime(loaded, store)(*requests[0])
        mixed = Batcher(loaded, store, args.window_ms / 1000, args.max_rows)
        single = Batcher(loaded, store, args.window_ms / 1000, args.max_rows)
        modes: dict[str, tuple[list, Callable]] = {
            "mixed": (requests, lambda k, t: mixed.score(k, t)),
            "shared": (shared, lambda k, t: single.score(k, t)),
            "one-at-a-time": (requests, OneAtATime(loaded, store)),
        }
        peft_load = peft_gap = None
        if not args.no_peft:
            # PEFT as its users run it: a model as transformers ships it (its own copy here,
            # linear layers through torch's default kernels).
            stock = load_model(args.model, args.device)
            onednn_inference(stock.model, on=False)
            peft = PeftSwitching(stock, store, keys, root / "peft")
            peft_same = PeftSwitching(loaded, store, keys, root / "peft")
            peft_load = statistics.median(peft.load_s)
            # The contenders must agree: same prefixes, same probabilities.
            peft_gap = max(float(np.abs(np.stack(peft(k, t)) - np.stack(
                single.score(k, t).probabilities)).max()) for k, t in requests[:16])
            modes["peft"] = (requests, peft)
            modes["peft-onednn"] = (requests, peft_same)
        try:
            results = replay_modes(modes, args.clients, args.rounds)
            mixed_rows = mixed.stats.mean_rows  # the table's batches, before the sweep's
            swept = []
            for clients in sweep:
                part = requests[:args.sweep_requests]
                pair = {"mixed": (part, modes["mixed"][1])}
                if "peft" in modes:
                    pair["peft"] = (part, modes["peft"][1])
                swept.append((clients, replay_modes(pair, clients, 1)))
        finally:
            mixed.close()
            single.close()

    by = results
    print(f"\n{'mode':<15}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for r in results.values():
        print(f"{r.name:<15}{r.rps:>8.1f}{r.pct(50):>9.0f}{r.pct(95):>9.0f}")
    if swept:
        peft_cols = "peft" in modes
        print(f"\nthroughput by load ({min(args.sweep_requests, len(requests))} requests at "
              "each client count)")
        print(f"{'clients':>7}  {'mixed req/s':>11}{'p50 ms':>8}{'p95 ms':>8}"
              + (f"  {'peft req/s':>10}{'p50 ms':>8}{'p95 ms':>8}{'mixed/peft':>12}"
                 if peft_cols else ""))
        for clients, res in swept:
            m = res["mixed"]
            line = f"{clients:>7}  {m.rps:>11.1f}{m.pct(50):>8.0f}{m.pct(95):>8.0f}"
            if peft_cols:
                c = res["peft"]
                line += (f"  {c.rps:>10.1f}{c.pct(50):>8.0f}{c.pct(95):>8.0f}"
                         f"{m.rps / c.rps:>11.2f}x")
            print(line)
    print(f"\nmixed batches held {mixed_rows:.1f} texts on average at {args.clients} clients")
    print(f"first load of a prefix from disk: median {statistics.median(loads) * 1000:.2f} ms, "
          f"max {max(loads) * 1000:.2f} ms to read its files, then median "
          f"{statistics.median(heads) * 1000:.1f} ms to read its template head once "
          "(PEFT load_adapter: "
          + (f"{peft_load * 1000:.0f} ms)" if peft_load is not None else "not run)"))
    if peft_gap is not None:
        print(f"PEFT and mixed batching agree: largest probability gap {peft_gap:.2e} over "
              f"{min(16, len(requests))} requests")
    print(f"memory per resident prefix: {held_mb:.3f} MB of key/values ({kv_mb:.3f} MB the "
          f"prefix, the rest its template head); RSS grew {(after - before) / len(keys):.3f} "
          f"MB per prefix loading {len(keys)}")
    ratios = {"mixed_vs_shared": by["mixed"].rps / by["shared"].rps,
              "mixed_vs_one": by["mixed"].rps / by["one-at-a-time"].rps}
    if "peft" in by:
        ratios["mixed_vs_peft"] = by["mixed"].rps / by["peft"].rps
        ratios["mixed_vs_peft_onednn"] = by["mixed"].rps / by["peft-onednn"].rps
    print()
    for name, value in ratios.items():
        goal = TARGETS.get(name)
        verdict = "" if goal is None else (f"  target >= {goal}: "
                                           + ("met" if value >= goal else "MISSED"))
        print(f"{name:<22}{value:>6.2f}x{verdict}")
    print("summary: " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items())
          + f" mixed_rps={by['mixed'].rps:.1f} first_load_ms={statistics.median(loads) * 1000:.2f}"
          f" head_ms={statistics.median(heads) * 1000:.1f} prefix_mb={held_mb:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
