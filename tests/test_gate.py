"""The gate in front of the app and the API server (prefixlab.serve.gate): Host check without a
login, the request-body cap, only documented routes, and the login throttle — each on a live
server, as a browser page on another origin or a script would meet it."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefixlab.serve.gate import LoginThrottle, allowed_hosts, host_name
from prefixlab.serve.limits import Limits
from prefixlab.ui.api import build_api, launch
from prefixlab.workbench import Workbench
from tests.test_app import free_port


def test_host_names_drop_their_port_and_brackets():
    assert host_name("127.0.0.1:7860") == "127.0.0.1"
    assert host_name("LocalHost:80") == "localhost"
    assert host_name("[::1]:7860") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("evil.example") == "evil.example"


def test_allowed_hosts_are_this_machine_unless_a_login_guards_the_server():
    assert allowed_hosts("127.0.0.1", login=False) == {"127.0.0.1", "localhost", "::1"}
    assert "myhost.lan" in allowed_hosts("myhost.lan", login=False)
    assert allowed_hosts("0.0.0.0", login=True) is None


def test_the_login_throttle_counts_failures_in_a_window():
    now = [0.0]
    throttle = LoginThrottle(attempts=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("a") == 0
        throttle.failed("a")
    assert throttle.wait_s("a") == pytest.approx(60) and throttle.wait_s("b") == 0
    now[0] = 61.0
    assert throttle.wait_s("a") == 0


@contextlib.contextmanager
def serving(workbench: Workbench, tmp_path: Path,
            login: tuple[str, str] | None = None) -> Iterator[int]:
    """The workbench's API served as `prefixlab serve` serves it (the gate included), offline,
    with Gradio's uploads under `tmp_path`; yields its port."""
    demo = build_api(workbench)
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
        launch(demo, workbench, "127.0.0.1", port, login, prevent_thread_lock=True,
               quiet=True)
        try:
            yield port
        finally:
            demo.close()


@contextlib.contextmanager
def api_server(tmp_path: Path, model: Path, login: tuple[str, str] | None = None,
               limits: Limits | None = None) -> Iterator[int]:
    workbench = Workbench(tmp_path / "data", model=str(model), limits=limits)
    with serving(workbench, tmp_path, login) as port:
        yield port


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None, chunked: bool = False) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 65536]
                                                  for i in range(0, len(body), 65536)]),
                         headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        conn.close()


def test_without_a_login_only_requests_to_this_machine_are_answered(tmp_path, model_dir):
    with api_server(tmp_path, model_dir) as port:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            status, _ = call(port, "GET", "/gradio_api/info", headers={"Host": host})
            assert status == 200, host
        # A page on another origin whose name resolves here (DNS rebinding) sends its name.
        body = json.dumps({"data": [""], "fn_index": 0, "session_hash": "x"}).encode()
        for method, path, payload in (("GET", "/", None), ("GET", "/gradio_api/info", None),
                                      ("POST", "/gradio_api/queue/join", body),
                                      ("POST", "/gradio_api/call/runs", body)):
            status, text = call(port, method, path, payload,
                                {"Host": f"rebind.example:{port}",
                                 "Content-Type": "application/json"})
            assert status == 403, path
            assert "rebind.example" in json.loads(text)["error"]


def test_with_a_login_any_host_is_answered_and_wrong_passwords_are_throttled(
        tmp_path, model_dir):
    with api_server(tmp_path, model_dir, login=("u", "right")) as port:
        status, _ = call(port, "GET", "/", headers={"Host": "some.name.lan"})
        assert status != 403
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        statuses = [call(port, "POST", "/login", urllib.parse.urlencode(
            {"username": "u", "password": f"guess{i}"}).encode(), form)[0] for i in range(6)]
        assert all(400 <= s < 500 and s != 429 for s in statuses[:5]), statuses
        assert statuses[5] == 429
        status, text = call(port, "POST", "/login", urllib.parse.urlencode(
            {"username": "u", "password": "right"}).encode(), form)
        assert status == 429 and "try again in" in json.loads(text)["error"]


def test_only_the_documented_routes_run_an_endpoint(tmp_path, model_dir):
    body = json.dumps({"data": [""]}).encode()
    headers = {"Content-Type": "application/json"}
    with api_server(tmp_path, model_dir) as port:
        for path in ("/gradio_api/run/runs", "/gradio_api/api/runs", "/gradio_api/run/runs/"):
            status, text = call(port, "POST", path, body, headers)
            assert status == 404 and "/gradio_api/call/runs" in json.loads(text)["error"]
        status, text = call(port, "POST", "/gradio_api/call/runs", body, headers)
        assert status == 200 and "event_id" in json.loads(text)


def test_a_body_over_the_limit_is_refused_whether_it_says_its_length_or_not(
        tmp_path, model_dir):
    limits = Limits(body_mb=0.5)
    big = json.dumps({"data": [["x" * 1000] * 1000, ["run"], False]}).encode()  # ~1 MB
    headers = {"Content-Type": "application/json"}
    with api_server(tmp_path, model_dir, limits=limits) as port:
        status, text = call(port, "POST", "/gradio_api/call/score", big, headers)
        assert status == 413 and "PREFIXLAB_MAX_BODY_MB" in json.loads(text)["error"]
        status, text = call(port, "POST", "/gradio_api/call/score", big, headers, chunked=True)
        assert status == 413 and "at most" in json.loads(text)["error"]
        small = json.dumps({"data": [""]}).encode()
        status, _ = call(port, "POST", "/gradio_api/call/runs", small, headers, chunked=True)
        assert status == 200


def test_a_client_that_cancels_stops_its_work(tmp_path, model_dir):
    """gradio_client's job.cancel() on a large /score: the batcher stops taking its chunks."""
    from gradio_client import Client

    from prefixlab.engine.prefix import save_prefix, text_key_values
    from prefixlab.workbench.runs import run_config
    from tests.test_app import write_reviews_csv

    workbench = Workbench(tmp_path / "data", model=str(model_dir))
    workbench.batch_window_s, workbench.batch_max_rows = 0.0, 2
    loaded = workbench.model()
    cfg = run_config(str(write_reviews_csv(tmp_path / "r.csv")), "text", "label", {},
                     model=workbench.default_model)
    run_id = workbench.store.create(cfg, workbench.model_info(), name="r")
    folder = workbench.store.folder(run_id)
    save_prefix(folder.prefix_path, text_key_values(loaded.model, loaded.tokenizer, "hi", 4),
                loaded.name)
    folder.set_status("completed")
    workbench.refresh()
    with serving(workbench, tmp_path) as port:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        texts = [f"the movie was fine {i} " + "word " * 40 for i in range(2000)]
        job = client.submit(texts, [run_id], False, api_name="/score")
        batcher = workbench.serving()
        deadline = time.monotonic() + 60
        while batcher.stats.rows < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        job.cancel()
        time.sleep(1.5)  # the handler notices within its poll, the chunk in hand ends
        rows = batcher.stats.rows
        time.sleep(1.5)
        assert batcher.stats.rows == rows < 2000  # nothing more of it ran
        # The server answers the next client as usual.
        assert client.predict(["good"], [run_id], False, api_name="/score")[0]["text"] == \
            "good"
