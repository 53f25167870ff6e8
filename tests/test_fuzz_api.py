"""The four endpoints against generated requests (hypothesis), over real HTTP as a script or a
hostile page would send them: wrong types, empty and huge values, odd Unicode (lone
surrogates included), NaN and infinite numbers, wrong argument counts, paths outside the
server's folders. Every answer is either a result or a refusal that says what to change:
never a traceback, never "Something went wrong", never a Python class name. A valid request
sent at the same moment is answered exactly as it is alone, and the process's memory stays
under a bound.

The profile decides how many requests: `ci` (the default, a few dozen per endpoint) or `full`
(PREFIXLAB_FUZZ_EXAMPLES per endpoint, default 2,500: 10,000 in all):

    HYPOTHESIS_PROFILE=full python -m pytest tests/test_fuzz_api.py
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefixlab.engine.prefix import save_prefix, text_key_values
from prefixlab.serve.limits import Limits
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_gate import serving

EXAMPLES = {"ci": 40, "full": int(os.environ.get("PREFIXLAB_FUZZ_EXAMPLES", "2500"))}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(max_examples=EXAMPLES.get(PROFILE, 40), deadline=None,
                suppress_health_check=list(HealthCheck))
# What a person must never read: the inside of the program instead of what to change.
INTERNAL = re.compile(r"Traceback|Something went wrong|object at 0x|NoneType|\w+Error\b|"
                      r"line \d+, in |Exception\b")
LIMITS = Limits(texts=50, rows_generated=16, chars=2000, new_tokens=16, body_mb=1.0,
                csv_rows=200, decode_mb=64)
RSS_GROWTH_MB = 1500


def _write_csv(path: Path, labels: tuple[str, str]) -> Path:
    rows = [f"the movie was {'great' if i % 2 else 'bad'} {i},{labels[i % 2]}"
            for i in range(20)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """A live API server with two runs whose label sets differ; yields (url, run ids)."""
    tmp = tmp_path_factory.mktemp("fuzz-api")
    workbench = Workbench(tmp / "data", model=str(model_dir), limits=LIMITS)
    loaded = workbench.model()
    ids = []
    for i, labels in enumerate((("negative", "positive"), ("spam", "ham"))):
        csv = _write_csv(tmp / f"run{i}.csv", labels)
        cfg = run_config(str(csv), "text", "label", {"prefix_length": 4},
                         model=workbench.default_model)
        run_id = workbench.store.create(cfg, workbench.model_info(), name=f"run{i}")
        folder = workbench.store.folder(run_id)
        save_prefix(folder.prefix_path, text_key_values(loaded.model, loaded.tokenizer,
                                                        "hello world", 4), loaded.name)
        folder.set_status("completed")
        ids.append(run_id)
    workbench.refresh()
    with serving(workbench, tmp) as port:
        yield f"http://127.0.0.1:{port}", ids


def call(url: str, endpoint: str, data: object) -> tuple[str, object]:
    """POST `data` as the endpoint's arguments and read the stream: ("complete", result),
    ("error", message) or ("refused", (status, message)) when the POST itself is refused."""
    body = json.dumps({"data": data}).encode()  # ensure_ascii: a lone surrogate goes as \\ud800
    post = urllib.request.Request(f"{url}/gradio_api/call/{endpoint}", data=body,
                                  headers={"Content-Type": "application/json"})
    try:
        event = json.load(urllib.request.urlopen(post, timeout=120))["event_id"]
    except urllib.error.HTTPError as e:
        return "refused", (e.code, e.read().decode(errors="replace"))
    stream = urllib.request.urlopen(f"{url}/gradio_api/call/{endpoint}/{event}", timeout=300)
    lines = stream.read().decode().splitlines()
    for kind in ("complete", "error"):
        if f"event: {kind}" in lines:
            raw = lines[lines.index(f"event: {kind}") + 1][len("data: "):]
            return kind, json.loads(raw) if raw not in ("", "null") else None
    raise AssertionError(f"no answer from {endpoint}: {lines[-5:]}")


def check_answer(kind: str, answer: object, request: object) -> None:
    """A result is plain JSON without NaN; a refusal has words and no internals."""
    if kind == "complete":
        assert not _has_nan(answer), (request, answer)
        return
    message = answer[1] if kind == "refused" else answer
    if isinstance(message, dict):  # Gradio's error event: {"error": message, ...}
        message = message.get("error")
    assert isinstance(message, str) and len(message.split()) >= 3, (request, message)
    assert not INTERNAL.search(message), (request, message)


def _has_nan(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


# --- what a client might send -------------------------------------------------------------------

ODD_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(), max_size=30),  # surrogates included
    st.sampled_from(["\ud800 x", "\udfff", "a\x00b", "\u202e\u0000", " ", "", "\n\t",
                     "🙂" * 50, "x" * 2001, "é" * 600]),
)
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 16, 17, 1025, 2**63, 0.5, 1e308]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT)
ANY = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=5), inner,
                                                                    max_size=3)),
                   max_leaves=8)


def run_ids(ids: list[str]):
    return st.one_of(st.just(ids[:1]), st.just(ids), st.lists(st.sampled_from(
        [*ids, "", "20990101-000000-missing", "../../etc", "a" * 200, "..", "/etc/passwd"]),
        max_size=3), ANY)


def texts():
    return st.one_of(st.lists(ODD_TEXT, max_size=6), st.lists(st.just("good"), min_size=51,
                                                              max_size=60), ODD_TEXT, ANY)


def arguments(draw, parts: list) -> list:
    """Arguments in order, sometimes too few or too many (Gradio refuses the count)."""
    values = [draw(p) for p in parts]
    cut = draw(st.sampled_from([None] * 8 + ["short", "long"]))
    if cut == "short":
        return values[:draw(st.integers(0, max(0, len(values) - 1)))]
    if cut == "long":
        return values + [draw(ANY)]
    return values


# --- the properties -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(server):
    """A valid request and its answer alone: the same request sent beside a fuzzed one must
    get exactly this answer."""
    url, ids = server
    request = [["the movie was great", "bad film"], ids, False]
    kind, answer = call(url, "score", request)
    assert kind == "complete" and not _has_nan(answer)
    # Two label sets: each row holds its own run's labels, nothing for the other's.
    assert {tuple(sorted(k for k in row if k.startswith("p("))) for row in answer[0]} == {
        ("p(negative)", "p(positive)"), ("p(ham)", "p(spam)")}
    return request, answer


def beside(url: str, baseline, endpoint: str, data: list) -> tuple[str, object]:
    """Send the fuzzed request and the valid one at the same moment; check the valid one."""
    request, want = baseline
    got: dict = {}
    valid = threading.Thread(target=lambda: got.update(answer=call(url, "score", request)))
    valid.start()
    kind, answer = call(url, endpoint, data)
    valid.join(timeout=300)
    assert got["answer"] == ("complete", want), (endpoint, data)
    return kind, answer


@FUZZ
@given(data=st.data())
def test_score_answers_or_refuses_clearly(server, baseline, data):
    url, ids = server
    request = arguments(data.draw, [texts(), run_ids(ids), st.one_of(st.booleans(), ANY)])
    kind, answer = beside(url, baseline, "score", request)
    check_answer(kind, answer, request)
    if kind == "complete":  # each row holds its own run's labels only
        for row in answer[0]:
            assert not any(k.startswith("p(") and v is None for k, v in row.items())


@FUZZ
@given(data=st.data())
def test_generate_answers_or_refuses_clearly(server, baseline, data):
    url, ids = server
    small = st.integers(0, 20)
    request = arguments(data.draw, [
        texts(), run_ids(ids), st.one_of(small, NUMBERS, ANY),
        st.one_of(st.booleans(), ANY), st.one_of(st.floats(0.1, 2), NUMBERS, ANY),
        st.one_of(st.floats(0.1, 1), NUMBERS, ANY), st.one_of(small, NUMBERS, ANY),
        st.one_of(st.integers(1, 4), NUMBERS, ANY), st.one_of(st.booleans(), ANY)])
    kind, answer = beside(url, baseline, "generate", request)
    check_answer(kind, answer, request)


@FUZZ
@given(data=st.data())
def test_runs_answers_or_refuses_clearly(server, baseline, data):
    url, ids = server
    request = arguments(data.draw, [st.one_of(st.sampled_from([*ids, ""]), ODD_TEXT, ANY)])
    kind, answer = beside(url, baseline, "runs", request)
    check_answer(kind, answer, request)


@FUZZ
@given(data=st.data())
def test_predict_csv_answers_or_refuses_clearly_and_reads_no_file_of_ours(server, baseline,
                                                                         data):
    url, ids = server
    files = st.one_of(
        st.sampled_from(["/etc/passwd", "../../etc/passwd", str(Path(__file__)), "", "."]
                        ).map(lambda p: {"path": p, "meta": {"_type": "gradio.FileData"}}),
        ANY)
    request = arguments(data.draw, [files, run_ids(ids), st.one_of(st.just(""), ODD_TEXT)])
    kind, answer = beside(url, baseline, "predict_csv", request)
    check_answer(kind, answer, request)
    assert kind != "complete", request  # none of these is a file a client uploaded


def test_memory_stays_bounded_after_the_fuzzing(server):
    """Runs last in this module: what the requests above left allocated."""
    rss_mb = psutil.Process().memory_info().rss / 2**20
    assert rss_mb < RSS_GROWTH_MB + 1000, f"RSS {rss_mb:.0f} MB after fuzzing"
