"""What no single request can do to the batcher: fail a request it shares a batch with, hold
the model while a 1-text request waits, go on after its client left, or decode beyond the
memory budget; and every bound refused before any work, naming what to change."""

from __future__ import annotations

import math
import threading

import pytest

from prefixlab.engine.decode import DecodeError, Sampling, decode_memory
from prefixlab.engine.predict import generate, score_labels
from prefixlab.errors import ConfigError
from prefixlab.serve import batcher as batcher_module
from prefixlab.serve.batcher import Batcher, results
from prefixlab.serve.limits import Limits, RequestError
from prefixlab.serve.store import PrefixStore
from tests.test_store import make_prefixes

TEXTS = ["the movie was great", "a terrible boring film", "fine", "hello world"]


@pytest.fixture
def served(loaded, tmp_path):
    keys = make_prefixes(loaded, tmp_path, 2)
    store = PrefixStore(loaded)
    made = []

    def make(**kwargs) -> Batcher:
        made.append(Batcher(loaded, store, **kwargs))
        return made[-1]

    yield loaded, store, keys, make
    for b in made:
        b.close()


def test_poison_is_refused_before_it_meets_anyone_and_valid_requests_are_unchanged(served):
    loaded, store, keys, make = served
    batcher = make(window_s=0.3)
    valid = [batcher.submit_score(keys[i % 2], TEXTS[:2]) for i in range(6)]
    for bad, match in (([["\ud800 x"]], "lone surrogate"), (["a string"], "list of strings"),
                       ([[1, 2]], r"texts\[0\] must be a string"),
                       ([["x" * 20_001]], "20,001 characters")):
        with pytest.raises(RequestError, match=match):
            batcher.submit_score(keys[0], *bad)
    with pytest.raises(DecodeError, match="temperature"):
        Sampling(0, math.nan)
    for i, future in enumerate(valid):
        kv, encoder = store.get(keys[i % 2]).kv, store.get(keys[i % 2]).encoder
        alone = score_labels(loaded.model, kv, encoder, TEXTS[:2])
        for got, want in zip(future.result(timeout=60).probabilities, alone, strict=True):
            assert got == pytest.approx(want, abs=1e-5)


def test_a_batch_that_fails_is_run_again_request_by_request(served, monkeypatch):
    loaded, store, keys, make = served
    real = batcher_module.mixed_score_labels

    def fragile(model, items, batch_size=32):
        if any(item.text == "boom" for item in items):
            raise RuntimeError("this row cannot run")
        return real(model, items, batch_size)

    monkeypatch.setattr(batcher_module, "mixed_score_labels", fragile)
    batcher = make(window_s=0.3)
    good = [batcher.submit_score(keys[0], TEXTS[:2]) for _ in range(3)]
    bad = batcher.submit_score(keys[1], ["fine", "boom"])
    with pytest.raises(RuntimeError, match="cannot run"):
        bad.result(timeout=60)
    assert all(len(f.result(timeout=60).probabilities) == 2 for f in good)
    assert batcher.stats.retried == 1 and batcher.stats.failed == 1


def _watched(monkeypatch, hold: threading.Event | None = None) -> list[int]:
    """Record each scoring batch's size; with `hold`, the first batch waits for it."""
    sizes: list[int] = []
    real = batcher_module.mixed_score_labels

    def watched(model, items, batch_size=32):
        sizes.append(len(items))
        if hold is not None and len(sizes) == 1:
            hold.wait(30)
        return real(model, items, batch_size)

    monkeypatch.setattr(batcher_module, "mixed_score_labels", watched)
    return sizes


def test_a_large_request_runs_a_chunk_at_a_time_and_a_small_one_waits_one_chunk(
        served, monkeypatch):
    loaded, store, keys, make = served
    hold = threading.Event()
    sizes = _watched(monkeypatch, hold)
    batcher = make(window_s=0.0, max_rows=8)
    big = batcher.submit_score(keys[0], [f"text {i}" for i in range(40)])
    while not sizes:  # the big request's first chunk (a quarter of max_rows) is running
        threading.Event().wait(0.01)
    small = batcher.submit_score(keys[1], ["fine", "bad", "good"])
    hold.set()
    small.result(timeout=60)
    assert not big.done()  # the small one did not wait for the whole large one
    assert sizes[:2] == [2, 3]  # its turn came right after the chunk it arrived during
    scored = big.result(timeout=120)
    assert len(scored.probabilities) == 40 and max(sizes) <= 2 + 3
    want = score_labels(loaded.model, store.get(keys[0]).kv, store.get(keys[0]).encoder,
                        [f"text {i}" for i in range(40)])
    for got, w in zip(scored.probabilities, want, strict=True):
        assert got == pytest.approx(w, abs=1e-5)


def test_a_cancelled_request_stops_after_its_chunk(served, monkeypatch):
    loaded, store, keys, make = served
    hold = threading.Event()
    sizes = _watched(monkeypatch, hold)
    batcher = make(window_s=0.0, max_rows=16)
    big = batcher.submit_score(keys[0], [f"text {i}" for i in range(40)])
    while not sizes:
        threading.Event().wait(0.01)
    gone = iter([False, True])
    with pytest.raises(batcher_module.Abandoned, match="went away"):
        results([big], stop=lambda: next(gone, True), poll_s=0.01)
    assert big.cancelled()
    hold.set()
    after = batcher.submit_score(keys[1], ["fine"])  # the line is free again at once
    after.result(timeout=60)
    assert sum(sizes) <= 4 + 4 + 1  # the chunk running, at most one more, and `after`


def test_generation_batches_stay_under_the_decode_budget(served, monkeypatch):
    loaded, store, keys, make = served
    config = loaded.model.config
    kv = store.get(keys[0]).kv
    prompts = ["the movie was", "a film", "hello", "the"]
    ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max(len(i) for i in ids)
    two_rows = decode_memory(config, 2, kv.shape[3], longest, 5)
    calls: list[int] = []
    real = batcher_module.mixed_generate

    def counted(model, tokenizer, kvs, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(model, tokenizer, kvs, rows, *args, **kwargs)

    monkeypatch.setattr(batcher_module, "mixed_generate", counted)
    budget = Limits(decode_mb=(two_rows + 1) / 2**20)
    batcher = make(window_s=0.0, limits=budget)
    got = batcher.generate(keys[0], prompts, 5)
    assert calls == [2, 2]
    assert got == generate(loaded.model, loaded.tokenizer, kv, prompts, 5)
    tight = make(limits=Limits(decode_mb=decode_memory(config, 1, kv.shape[3], longest, 5)
                               / 2**20 * 0.5))
    with pytest.raises(RequestError, match="to decode.*PREFIXLAB_MAX_DECODE_MB"):
        tight.generate(keys[0], prompts[:1], 5)


def test_every_bound_is_refused_before_any_work(served):
    loaded, store, keys, make = served
    batcher = make(limits=Limits(texts=3, rows_generated=4, chars=50, new_tokens=8))
    refusals = [
        (lambda: batcher.submit_score(keys[0], ["x"] * 4), "at most 3 per request"),
        (lambda: batcher.submit_generate(keys[0], ["x"] * 2, 4, num_beams=3),
         "2 prompts × 3 beams is 6 rows"),
        (lambda: batcher.submit_generate(keys[0], ["x"], 9), "max_new_tokens must be 1..8"),
        (lambda: batcher.submit_generate(keys[0], ["x"], 4, num_beams=True), "whole number"),
        (lambda: batcher.submit_generate(keys[0], ["x"], 4, length_penalty=math.inf),
         "finite"),
        (lambda: batcher.submit_score(keys[0], ["y" * 51]), "at most 50 per text"),
    ]
    for submit, match in refusals:
        with pytest.raises(RequestError, match=match):
            submit()
    assert batcher.stats.batches == 0


def test_limits_come_from_the_environment_and_bad_values_are_named():
    limits = Limits.from_env({"PREFIXLAB_MAX_TEXTS": "10", "PREFIXLAB_MAX_DECODE_MB": "512.5"})
    assert limits.texts == 10 and limits.decode_mb == 512.5 and limits.chars == Limits().chars
    for name, value in (("PREFIXLAB_MAX_TEXTS", "many"), ("PREFIXLAB_MAX_CHARS", "0"),
                        ("PREFIXLAB_MAX_BODY_MB", "nan")):
        with pytest.raises(ConfigError, match=name):
            Limits.from_env({name: value})
