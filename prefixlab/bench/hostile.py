"""Benchmark: a hostile probe of the API server (`python -m prefixlab serve`).

`python -m prefixlab.bench.hostile` writes two completed runs with different label sets into
a fresh data directory, starts the server from a checkout (`--repo`, default this one; point
it at an older checkout to measure before and after with the same probe) under an
address-space cap, and then, over plain HTTP:

1. **Probe classes**: each request a hostile or careless client might send, alone: poison
   values, wrong types, sizes past every bound, the routes and headers of an attack. Each
   ends as *correct* (answered, valid JSON), *clear* (refused with words a person can act
   on), *accepted* (answered where a bound should have refused it), *crash* (an internal
   error, a 5xx, invalid JSON) or *hang* (no answer within `--timeout`; the server is then
   restarted, since it is still busy).
2. **Load**: `--clients` clients (default 32) send valid requests, 10 % of them replaced by
   poison; every valid answer is compared with the same request answered alone.
3. **Beside a maximal request**: while the largest request the bounds allow runs (scoring
   `PREFIXLAB_MAX_TEXTS` texts; then decoding `PREFIXLAB_MAX_ROWS_GENERATED` prompts for
   `--max-new-tokens`), a client sends 1-text requests; their p50/p95 latency.

The server's peak RSS is sampled throughout. One `summary:` line ends the output. Run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from prefixlab.engine.models import DEFAULT_MODEL, load_model
from prefixlab.engine.prefix import PrefixConfig, save_prefix, text_key_values
from prefixlab.files import atomic_write_json
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder

REPO = Path(__file__).resolve().parents[2]
INTERNAL = re.compile(r"Traceback|Something went wrong|object at 0x|NoneType|\w+Error\b|"
                      r"line \d+, in ")
RUNS = {"20261206-000000-probe-sentiment": ("negative", "positive"),
        "20261206-000001-probe-spam": ("ham", "spam")}
VALID_TEXTS = ["the movie was great", "a terrible boring film", "fine", "win a free phone now",
               "see you at lunch", "worst service ever", "I loved every minute",
               "call this number to claim"]


# --- the server -------------------------------------------------------------------------------


def make_data_dir(root: Path, model: str) -> list[str]:
    """Two completed runs (run folders as training leaves them) with different label sets."""
    loaded = load_model(model)
    for run_id, labels in RUNS.items():
        folder = root / "runs" / run_id
        folder.mkdir(parents=True)
        cfg = RunConfig(train_csv="probe.csv", model=loaded.name, max_length=96,
                        prefix=PrefixConfig(prefix_length=10))
        run = cfg.to_dict()
        run.pop("precision", None)  # older checkouts refuse keys they do not know: float32
        atomic_write_json(folder / "config.json", {"format": "prefixlab-run/1",
                                                   "name": run_id.split("-", 2)[2],
                                                   "run": run, "labels": list(labels)})
        kv = text_key_values(loaded.model, loaded.tokenizer,
                             f"Classify the text as {labels[0]} or {labels[1]}.", 10)
        save_prefix(folder / "prefix.safetensors", kv, loaded.name)
        RunFolder(folder).set_status("completed")
    return list(RUNS)


class Server:
    """`python -m prefixlab serve` from a checkout, in its own process group, capped."""

    def __init__(self, repo: Path, data_dir: Path, model: str, memory_cap_gb: float,
                 env: dict[str, str]) -> None:
        self.repo, self.data_dir, self.model = repo, data_dir, model
        self.cap = int(memory_cap_gb * 2**30)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self.restarts = -1
        self.log = data_dir / "server.log"

    def start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = self.repo / ".venv" / "bin" / "python"
        cap = self.cap

        def limit() -> None:
            os.setsid()
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        self.proc = subprocess.Popen(
            [str(python if python.exists() else sys.executable), "-m", "prefixlab", "serve",
             "--data-dir", str(self.data_dir), "--port", str(self.port), "--model", self.model],
            cwd=self.repo, env=self.env, preexec_fn=limit,
            stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        self.restarts += 1
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log}")
            try:
                urllib.request.urlopen(f"{self.url}/gradio_api/info", timeout=5)
                break
            except OSError:
                time.sleep(1)
        call(self.url, "runs", [""], timeout=600)  # the model is loaded and warm

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            try:
                if self.proc is not None and self.proc.poll() is None:
                    self.peak_rss = max(self.peak_rss,
                                        psutil.Process(self.proc.pid).memory_info().rss)
            except psutil.Error:
                pass

    def log_lines(self) -> int:
        return sum(1 for _ in self.log.open(errors="replace")) if self.log.exists() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one request --------------------------------------------------------------------------------


@dataclass
class Answer:
    outcome: str  # correct, clear, accepted, crash, hang
    seconds: float
    result: object = None
    message: str = ""


def call(url: str, endpoint: str, data: object, timeout: float = 60, raw: bytes | None = None,
         headers: dict | None = None, route: str = "call", expect: str = "answer") -> Answer:
    """POST to /gradio_api/<route>/<endpoint> and read the answer's stream."""
    start = time.perf_counter()
    body = raw if raw is not None else json.dumps({"data": data}).encode()
    post = urllib.request.Request(f"{url}/gradio_api/{route}/{endpoint}", data=body,
                                  headers={"Content-Type": "application/json", **(headers or {})})
    try:
        first = urllib.request.urlopen(post, timeout=timeout).read().decode(errors="replace")
        event = json.loads(first).get("event_id") if route == "call" else None
        if event is None:
            return _judge(first, start, expect, http=True)
        stream = urllib.request.urlopen(f"{url}/gradio_api/call/{endpoint}/{event}",
                                        timeout=timeout)
        lines = []
        while True:  # heartbeats keep the socket alive: the deadline is the whole answer's
            line = stream.readline()
            if not line:
                break
            lines.append(line.decode(errors="replace").rstrip("\n"))
            if lines[-1].startswith("event: ") and lines[-1] != "event: heartbeat":
                lines.append(stream.readline().decode(errors="replace").rstrip("\n"))
                break
            if time.perf_counter() - start > timeout:
                stream.close()
                return Answer("hang", time.perf_counter() - start, message="no answer")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        outcome = "crash" if e.code >= 500 else ("clear" if _readable(text) else "crash")
        return Answer(outcome, time.perf_counter() - start, message=f"{e.code} {text[:200]}")
    except TimeoutError as e:
        return Answer("hang", time.perf_counter() - start, message=str(e)[:200])
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, TimeoutError)
        return Answer("hang" if timed_out else "crash", time.perf_counter() - start,
                      message=str(e)[:200])
    except OSError as e:  # the connection dropped: the server died or cut it
        return Answer("crash", time.perf_counter() - start, message=str(e)[:200])
    for kind in ("complete", "error"):
        if f"event: {kind}" in lines:
            data_line = lines[lines.index(f"event: {kind}") + 1][len("data: "):]
            if kind == "error":
                text = data_line
                return Answer("clear" if _readable(text) else "crash",
                              time.perf_counter() - start, message=text[:300])
            return _judge(data_line, start, expect)
    return Answer("crash", time.perf_counter() - start, message=" | ".join(lines[-3:])[:300])


def _readable(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if isinstance(value, dict):
        value = value.get("error") or value.get("detail") or ""
    return isinstance(value, str) and len(value.split()) >= 3 and not INTERNAL.search(value)


def _judge(text: str, start: float, expect: str, http: bool = False) -> Answer:
    seconds = time.perf_counter() - start
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return Answer("crash", seconds, message=f"invalid JSON: {text[:200]}")
    if http:  # a route that answered directly, outside the documented call/stream
        return Answer("accepted", seconds, value, "answered on an undocumented route")
    return Answer("correct" if expect == "answer" else "accepted", seconds, value)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# --- the probe's classes ------------------------------------------------------------------------


@dataclass
class Probe:
    name: str
    endpoint: str
    data: object = None
    expect: str = "refuse"  # "answer": a valid request
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)
    route: str = "call"


def probes(ids: list[str], max_texts: int, max_rows: int) -> list[Probe]:
    a, b = ids
    many = [f"text number {i}, fairly short" for i in range(max_texts)]
    return [
        Probe("score, valid", "score", [["great film"], [a], False], "answer"),
        Probe("score, two label sets", "score", [["great film"], [a, b], False], "answer"),
        Probe("generate, greedy", "generate", [["The movie was"], [a], 8, False, 1.0, 1.0, 0, 1,
                                               False], "answer"),
        Probe("generate, sampled", "generate", [["The movie was"], [a], 8, True, 0.8, 0.9, 7,
                                                1, False], "answer"),
        Probe("generate, beams", "generate", [["The movie was"], [a], 8, False, 1.0, 1.0, 0, 3,
                                              False], "answer"),
        Probe("runs", "runs", [""], "answer"),
        Probe(f"score, {max_texts} texts (the bound)", "score", [many, [a], False], "answer"),
        Probe("lone surrogate", "score", [["\ud800 x"], [a], False]),
        Probe("NaN temperature", "generate", [["hi"], [a], 8, True, math.nan, 1.0, 0, 1, False]),
        Probe("infinite top_p", "generate", [["hi"], [a], 8, True, 1.0, math.inf, 0, 1, False]),
        Probe("string for a list", "score", ["great film", [a], False]),
        Probe("number for a list", "score", [5, [a], False]),
        Probe("object for texts", "score", [{"a": 1}, [a], False]),
        Probe("list of numbers", "score", [[1, 2, 3], [a], False]),
        Probe("string run_ids", "score", [["x"], a, False]),
        Probe("bool max_new_tokens", "generate", [["hi"], [a], True, False, 1.0, 1.0, 0, 1,
                                                  False]),
        Probe("float num_beams", "generate", [["hi"], [a], 8, False, 1.0, 1.0, 0, 2.5, False]),
        Probe("negative seed", "generate", [["hi"], [a], 8, True, 1.0, 1.0, -1, 1, False]),
        Probe("defaults left out", "generate", [["The movie was"], [a]], "answer"),
        Probe("a required argument left out", "score", [["hi"]]),
        Probe("too many arguments", "score", [["hi"], [a], False, 1, 2]),
        Probe("no data", "score", raw=b'{"nothing": 1}'),
        Probe("not JSON", "score", raw=b"{this is not json"),
        Probe("unknown run", "score", [["hi"], ["20990101-000000-missing"], False]),
        Probe("traversal run id", "score", [["hi"], ["../../etc"], False]),
        Probe("48,000-character text", "score", [["word " * 9600], [a], False]),
        Probe(f"{10 * max_texts} texts", "score", [many * 10, [a], False]),
        Probe("64 prompts x 16 beams", "generate", [["hi"] * 64, [a], 40, False, 1.0, 1.0, 0,
                                                    16, False]),
        Probe("256 greedy prompts", "generate", [["hi"] * 256, [a], 40, False, 1.0, 1.0, 0, 1,
                                                 False]),
        Probe("max_new_tokens 100000", "generate", [["hi"], [a], 100000, False, 1.0, 1.0, 0, 1,
                                                    False]),
        Probe("60 MB body", "score", raw=json.dumps({"data": [["x" * 60_000_000], [a], False]}
                                                    ).encode()),
        Probe("file outside the uploads", "predict_csv",
              [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, [a], ""]),
        Probe("rebinding Host header", "runs", [""], headers={"Host": "attacker.example"}),
        Probe("unqueued route /run", "score", [["hi"], [a], False], route="run"),
        Probe("unqueued route /api", "score", [["hi"], [a], False], route="api"),
    ]


def run_probes(server: Server, ids: list[str], max_texts: int, max_rows: int,
               timeout: float) -> list[tuple[Probe, Answer]]:
    out = []
    for probe in probes(ids, max_texts, max_rows):
        answer = call(server.url, probe.endpoint, probe.data, timeout, probe.raw, probe.headers,
                      probe.route, probe.expect)
        out.append((probe, answer))
        if answer.outcome == "hang" or server.proc.poll() is not None:
            server.stop()  # still busy with it, or dead: a fresh one for the next class
            server.start()
    return out


# --- load, with poison among it -----------------------------------------------------------------


POISON = [
    lambda a: ("score", [["\ud800 x"], [a], False]),
    lambda a: ("generate", [["hi"], [a], 4, True, math.nan, 1.0, 0, 1, False]),
    lambda a: ("score", ["a string", [a], False]),
    lambda a: ("score", [[1, 2], [a], False]),
    lambda a: ("generate", [["hi"], [a], "four", False, 1.0, 1.0, 0, 1, False]),
]


def valid_requests(ids: list[str]) -> list[tuple[str, list]]:
    requests = []
    for i, text in enumerate(VALID_TEXTS):
        run = ids[i % 2]
        requests.append(("score", [[text, VALID_TEXTS[(i + 1) % 8]], [run], False]))
        requests.append(("generate", [[text], [run], 6, False, 1.0, 1.0, 0, 1, False]))
    return requests


def load(server: Server, ids: list[str], clients: int, total: int, timeout: float,
         seed: int = 0) -> dict:
    """`total` requests from `clients` closed-loop clients, 10 % poison; valid answers
    checked against the same requests answered alone."""
    valid = valid_requests(ids)
    alone = [call(server.url, e, d, timeout).result for e, d in valid]
    rng = random.Random(seed)
    plan = [("poison", rng.randrange(len(POISON))) if rng.random() < 0.1
            else ("valid", rng.randrange(len(valid))) for _ in range(total)]
    lock = threading.Lock()
    stats: Counter = Counter()
    latencies: list[float] = []
    wrong: list[str] = []

    def client(jobs: list) -> None:
        for kind, k in jobs:
            if kind == "poison":
                endpoint, data = POISON[k](rng.choice(ids))
                answer = call(server.url, endpoint, data, timeout)
                with lock:
                    stats[f"poison {answer.outcome}"] += 1
                continue
            endpoint, data = valid[k]
            answer = call(server.url, endpoint, data, timeout)
            with lock:
                latencies.append(answer.seconds)
                if answer.outcome != "correct":
                    stats["valid failed"] += 1
                    wrong.append(f"{endpoint}: {answer.outcome} {answer.message[:120]}")
                elif not _same(answer.result, alone[k]):
                    stats["valid wrong"] += 1
                    wrong.append(f"{endpoint}: differs from alone")
                else:
                    stats["valid answered"] += 1

    jobs = [plan[i::clients] for i in range(clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    n_valid = sum(1 for kind, _ in plan if kind == "valid")
    return {"requests": total, "valid": n_valid, "seconds": seconds, "stats": dict(stats),
            "answered_share": stats["valid answered"] / max(1, n_valid),
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
            "wrong": wrong[:5]}


def _same(got: object, want: object) -> bool:
    """Equal answers, probabilities within float noise of a differently composed batch."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= 2e-3
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in got)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    return got == want


# --- a small request beside the largest one allowed ---------------------------------------------


def beside(server: Server, big: tuple[str, list], small: tuple[str, list], timeout: float,
           gap_s: float = 0.2) -> dict:
    """1-text requests sent one after another while `big` runs: their latencies."""
    done = threading.Event()
    big_answer: list[Answer] = []

    def run_big() -> None:
        big_answer.append(call(server.url, *big, timeout=timeout))
        done.set()

    thread = threading.Thread(target=run_big)
    thread.start()
    time.sleep(1.0)  # the big request is in line and running
    latencies = []
    while not done.is_set():
        answer = call(server.url, *small, timeout=timeout)
        if not done.is_set():
            latencies.append(answer.seconds)
        time.sleep(gap_s)
    thread.join()
    return {"big_outcome": big_answer[0].outcome, "big_s": big_answer[0].seconds,
            "small_requests": len(latencies),
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p95_s": float(np.percentile(latencies, 95)) if latencies else None}


# --- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose server to probe (its .venv if it has one)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=320, help="requests in the load phase")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a hang")
    p.add_argument("--memory-cap-gb", type=float, default=8.0)
    p.add_argument("--max-texts", type=int, default=2000,
                   help="the largest /score the server allows (set as its PREFIXLAB_MAX_TEXTS)")
    p.add_argument("--max-rows", type=int, default=64, help="the largest /generate (set as its "
                                                           "PREFIXLAB_MAX_ROWS_GENERATED)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="new tokens per prompt of the maximal /generate")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: probes, load, "
                                              "beside (or beside-score, beside-generate)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=str(args.repo), PREFIXLAB_MAX_TEXTS=str(args.max_texts),
               PREFIXLAB_MAX_ROWS_GENERATED=str(args.max_rows))
    with tempfile.TemporaryDirectory(prefix="prefixlab-hostile-") as tmp:
        data_dir = Path(tmp) / "data"
        ids = make_data_dir(data_dir, args.model)
        server = Server(args.repo.resolve(), data_dir, args.model, args.memory_cap_gb, env)
        server.start()
        sampling = threading.Event()
        threading.Thread(target=server.sample, args=(sampling,), daemon=True).start()
        report: dict = {"repo": str(args.repo), "model": args.model}
        try:
            if "probes" not in skip:
                results = run_probes(server, ids, args.max_texts, args.max_rows, args.timeout)
                print(f"{'class':<36} {'outcome':<9} {'s':>7}  message")
                for probe, answer in results:
                    print(f"{probe.name:<36} {answer.outcome:<9} {answer.seconds:7.2f}  "
                          f"{' '.join(answer.message.split())[:90]}")
                report["probes"] = {probe.name: answer.outcome for probe, answer in results}
            if "load" not in skip:
                report["load"] = load(server, ids, args.clients, args.requests, args.timeout)
                print("load:", json.dumps(report["load"]))
            small = ("score", [["great film"], [ids[0]], False])
            if not skip & {"beside", "beside-score"}:
                report["beside_score"] = beside(server, ("score", [[
                    f"text number {i}, fairly short" for i in range(args.max_texts)], [ids[0]],
                    False]), small, args.timeout * 10)
                print("1-text /score beside a maximal /score:",
                      json.dumps(report["beside_score"]))
            if not skip & {"beside", "beside-generate"}:
                big_gen = ("generate", [["Once upon a time"] * args.max_rows, [ids[0]],
                                        args.max_new_tokens, False, 1.0, 1.0, 0, 1, False])
                report["beside_generate"] = beside(server, big_gen, small, args.timeout * 10)
                print("1-text /score beside a maximal /generate:",
                      json.dumps(report["beside_generate"]))
        finally:
            sampling.set()
            report["peak_rss_gb"] = server.peak_rss / 2**30
            report["restarts"] = server.restarts
            report["log_lines"] = server.log_lines()
            server.stop()
    outcomes = Counter(report.get("probes", {}).values())
    load_part = report.get("load", {})
    print(f"summary: probes {dict(outcomes)}; load valid answered "
          f"{load_part.get('answered_share', float('nan')):.1%} p95 "
          f"{load_part.get('p95_s') or float('nan'):.2f}s; 1-text /score p95 beside maximal "
          f"/score {report.get('beside_score', {}).get('p95_s') or float('nan'):.2f}s, beside "
          f"maximal /generate {report.get('beside_generate', {}).get('p95_s') or float('nan'):.2f}"
          f"s; peak RSS {report['peak_rss_gb']:.2f} GB; restarts {report['restarts']}; "
          f"log lines {report['log_lines']}")
    print("json:", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
