"""Eight API users at once while a run trains: they poll the runs list and score texts with
a finished prefix through the app's `/runs` and `/score` endpoints (plain values, no browser
session). Nothing may fail, and the status polls must stay quick.

Two rounds of eight users: first with `gradio_client`, then with Gradio's plain HTTP API
(`POST /gradio_api/call/<name>`, then read the event stream): the same queue and handlers.
HTTP users keep a session each, as a browser does. gradio_client adds ~100 ms a call by
itself (it polls for messages every 50 ms) and slows down sharply with eight clients in one
process, so the HTTP round shows the app's own latency.
Prints p50/p95 of the status poll for both (target p95 <= 300 ms on a 2-core machine) and
the handler's own time; asserts only generous bounds, so that a busy machine is no failure.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.conftest import save_tiny_model
from tests.test_app import served, wait_for_run, write_reviews_csv

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]

CLIENTS = 8
ROUNDS = 10  # per user: two status polls (all runs, one run), then one scoring call
CLIENT_P95_BOUND_S = 3.0  # gradio_client itself: measured p95 0.65-1.15 s here, by load
HTTP_P95_BOUND_S = 1.0



def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _summary(name: str, values: list[float]) -> str:
    return (f"{name} ({len(values)} calls): p50 {statistics.median(values) * 1000:.0f} ms, "
            f"p95 {_percentile(values, 95) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms")


def call_http(http: httpx.Client, api_name: str, *data, session: str | None = None):
    """One call through Gradio's HTTP API: queue the event, read its stream to the end.

    Keep a `session` across calls as a browser does: without one, Gradio builds a new session
    state for every call, a copy of every component's config (~170 here, ~30 ms of CPU)."""
    r = http.post(f"gradio_api/call/{api_name}", json={"data": list(data), "session_hash": session})
    r.raise_for_status()
    event, result = None, None
    with http.stream("GET", f"gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                result = json.loads(line.split(":", 1)[1])
    if event != "complete":
        raise AssertionError(f"/{api_name} ended with {event}: {result}")
    return result[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("load")


@pytest.fixture(scope="module")
def workbench(workdir) -> Workbench:
    return Workbench(workdir / "data", model=str(save_tiny_model(workdir / "tiny-llama")))


@pytest.fixture(scope="module")
def url(workbench, workdir):
    with served(workbench, workdir) as u:
        yield u


class Caller:
    """One user's way in: `gradio_client` or plain HTTP (which sends every input: no defaults)."""

    def __init__(self, url: str, transport: str) -> None:
        self.transport = transport
        self.client = Client(url, verbose=False) if transport == "gradio_client" else None
        self.http = httpx.Client(base_url=url, timeout=30)
        self.session = uuid.uuid4().hex

    def __call__(self, api_name: str, *data):
        if self.client:
            return self.client.predict(*data, api_name=f"/{api_name}")
        return call_http(self.http, api_name, *data, session=self.session)

    def close(self) -> None:
        if self.client:
            self.client.close()
        self.http.close()


def load_round(workbench: Workbench, url: str, transport: str, done: str,
               training: str) -> dict[str, list[float]]:
    """CLIENTS users, each ROUNDS times: poll all runs, poll the training run, score two
    texts with the finished run's prefix. Returns the latencies; fails on any error."""
    callers = [Caller(url, transport) for _ in range(CLIENTS)]
    latency: dict[str, list[float]] = {"status": [], "score": [], "handler": []}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def timed(key: str, call, *args):
        t = time.perf_counter()
        result = call(*args)
        with lock:
            latency[key].append(time.perf_counter() - t)
        return result

    def user(call: Caller) -> None:
        start.wait()
        for _ in range(ROUNDS):
            try:
                rows = timed("status", call, "runs", "")
                states = {r["name"]: r["state"] for r in rows}
                assert states == {"done": "completed", "training": "running"}, states
                [row] = timed("status", call, "runs", training)
                assert row["state"] == "running" and row["step"] > 0, row
                scored = timed("score", call, "score",
                               ["the movie was great", "a bad film"], [done], False)
                assert len(scored) == 2, scored
                for s in scored:
                    p = s["p(negative)"] + s["p(positive)"]
                    assert s["source"] == "prefix: done" and abs(p - 1) < 1e-3, s
            except Exception as e:  # collected, so one failure does not hide the others
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    runs = workbench.runs
    threads = [threading.Thread(target=user, args=(c,)) for c in callers]
    with pytest.MonkeyPatch.context() as mp:  # the handler's own share of the latency
        mp.setattr(workbench, "runs", lambda: timed("handler", runs))
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        wall = time.perf_counter() - began
    for c in callers:
        c.close()
    assert not any(t.is_alive() for t in threads), f"a {transport} user hung"
    assert not errors, f"{len(errors)} failed {transport} rounds, e.g. {errors[:3]}"
    print(f"\n{CLIENTS} {transport} users x {ROUNDS} rounds in {wall:.1f} s while a run "
          "trained (target: status poll p95 <= 300 ms)\n  "
          + "\n  ".join(_summary(f"{key}", latency[key]) for key in latency))
    return latency


def test_eight_clients_poll_and_score_while_a_run_trains(workbench, workdir, url):
    csv = str(write_reviews_csv(workdir / "reviews.csv"))
    model = workbench.default_model
    done = workbench.start_run(run_config(csv, "text", "label", {}, model=model), name="done")
    wait_for_run(workbench, done, lambda r: r.state == "completed")
    long_cfg = run_config(csv, "text", "label", {"epochs": 200, "batch_size": 1, "patience": 0},
                          model=model)
    training = workbench.start_run(long_cfg, name="training")
    step_before = wait_for_run(workbench, training,
                            lambda r: r.state == "running" and r.step >= 3).step

    client = load_round(workbench, url, "gradio_client", done, training)
    http = load_round(workbench, url, "HTTP", done, training)
    assert _percentile(client["status"], 95) < CLIENT_P95_BOUND_S
    assert _percentile(http["status"], 95) < HTTP_P95_BOUND_S

    # The worker kept training under the load, and stops when asked.
    assert workbench.store.get(training).step > step_before
    workbench.store.cancel(training)
    assert wait_for_run(workbench, training, lambda r: r.state == "cancelled").state == "cancelled"
