"""The Train tab follows the run its person started or picked, and Cancel stops that run only
(issue 26, item 1): a status poll still reading when another run is started or picked must
not bring the old run back.

The runs are real registry entries with a stand-in worker (tests/stand_in_worker.py) that
says "running" until the test lets it go: no model, no training. The handlers are called
directly, in the order a slow poll and a click meet on a busy machine.
"""

from __future__ import annotations

import sys

import gradio as gr
import pytest

from prefixlab.engine.models import ModelInfo
from prefixlab.engine.prefix import PrefixShape
from prefixlab.ui import train_tab
from prefixlab.ui.train_tab import Followed
from prefixlab.workbench import Workbench
from prefixlab.workbench.runs import run_config
from tests.test_run_lock import STAND_IN, Release

INFO = ModelInfo("tiny-model", PrefixShape(2, 2, 8), 10_000)
# The poll outputs of train_tab.build(), by name.
OUTPUTS = ["view", "follow", "status", "progress", "loss", "eval", "report", "per_class",
           "confusion", "baselines", "timer", "cancel"]


@pytest.fixture
def workbench(tmp_path):
    wb = Workbench(tmp_path / "data", model="tiny-model")
    wb.store.worker_command = [sys.executable, str(STAND_IN)]
    wb.store.spawned = []

    def spawn(*args, **kwargs):  # keep each Popen, so the test can wait for its worker
        proc = type(wb.store)._spawn(wb.store, *args, **kwargs)
        wb.store.spawned.append(proc)
        return proc

    wb.store._spawn = spawn
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(20)))
    wb.csv = csv
    yield wb
    for proc in wb.store.spawned:
        proc.kill()
        proc.wait()


def start(workbench, name: str, gates: list) -> str:
    """A run whose stand-in worker says "running" until its gate is released."""
    cfg = run_config(str(workbench.csv), "text", "label", {}, model="tiny-model")
    rid = workbench.store.create(cfg, INFO, name=name)
    gates.append(Release(workbench.folder(rid).path))
    workbench.store.start(rid)
    return rid


def wait_running(workbench, *ids) -> None:
    import time

    end = time.monotonic() + 30
    while time.monotonic() < end:
        workbench.refresh()
        if all(workbench.store.get(i).state == "running" for i in ids):
            return
        time.sleep(0.05)
    raise AssertionError("the stand-in workers did not start")


def named(outputs: list) -> dict:
    return dict(zip(OUTPUTS, outputs, strict=True))


def apply(page: dict, outputs: list) -> None:
    """What the browser does with an event's outputs: each value replaces the last, a skip
    leaves it (gr.update dicts are merged into the component's last value)."""
    for key, value in named(outputs).items():
        if isinstance(value, dict) and value.get("__type__") == "update":
            if value != gr.skip():
                page[key] = {**page.get(key, {}), **value}
        else:
            page[key] = value


@pytest.fixture
def two_runs(workbench):
    """Run A training, followed by this page; run B started from the same page."""
    gates: list = []
    a = start(workbench, "first", gates)
    wait_running(workbench, a)
    yield workbench, a, gates
    for gate in gates:
        gate.release()


def test_a_poll_answered_after_a_start_leaves_the_page_on_the_new_run(two_runs, monkeypatch):
    workbench, a, gates = two_runs
    followed, page = Followed(), {}
    apply(page, train_tab.on_follow(workbench, followed, a))
    assert page["cancel"]["value"] == f"Cancel run {a}"

    # A poll of A starts; while it reads A's log, the person starts B from the same page.
    read = workbench.metrics
    started: list = []

    def slow_read(rid, offset=0):
        if rid == a and not started:
            started.append(None)  # once: Start's own render reads the log too
            monkeypatch.setattr(workbench, "start_run",
                                lambda cfg, name, data_name: start(workbench, name, gates))
            state = {"path": str(workbench.csv), "name": "data.csv", "text": "text",
                     "label": "label"}
            settings = [train_tab.PRESETS["Quick look"][k] for k in train_tab.SETTING_NAMES]
            started[0] = train_tab.on_start(workbench, followed, state, "second", "", 1,
                                            None, *settings)
            apply(page, started[0])
        return read(rid, offset)

    monkeypatch.setattr(workbench, "metrics", slow_read)
    late = train_tab.on_tick(workbench, followed, page["view"])
    monkeypatch.setattr(workbench, "metrics", read)
    b = started[0][0]["run_id"]
    assert b != a and followed.run_id == b
    assert late == [gr.skip()] * len(OUTPUTS)  # the old run's answer is dropped
    apply(page, late)
    assert page["view"]["run_id"] == b and "**second**" in page["status"]
    assert page["follow"]["value"] == b and page["cancel"]["value"] == f"Cancel run {b}"

    apply(page, train_tab.on_cancel(workbench, followed, page["view"]))
    assert workbench.folder(b).cancel_requested()
    assert not workbench.folder(a).cancel_requested()  # the run still training is left alone


def test_a_poll_applied_after_a_pick_cannot_move_cancel_or_the_next_poll(two_runs):
    """The poll's answer was computed before the pick and reaches the page after it (a slow
    connection): the page shows the old run for one poll at most, Cancel and the next poll
    act on the pick."""
    workbench, a, gates = two_runs
    b = start(workbench, "second", gates)
    wait_running(workbench, b)
    followed, page = Followed(), {}
    apply(page, train_tab.on_follow(workbench, followed, a))

    answer = train_tab.on_tick(workbench, followed, page["view"])  # computed while A is shown
    apply(page, train_tab.on_follow(workbench, followed, b))  # the pick
    apply(page, answer)  # the old answer arrives
    assert followed.run_id == b
    assert page["follow"]["value"] == b and page["cancel"]["value"] == f"Cancel run {b}"
    assert page["timer"].active  # the next poll comes, and it shows the pick
    apply(page, train_tab.on_tick(workbench, followed, page["view"]))
    assert page["view"]["run_id"] == b and "**second**" in page["status"]

    apply(page, train_tab.on_cancel(workbench, followed, page["view"]))
    assert workbench.folder(b).cancel_requested() and not workbench.folder(a).cancel_requested()


def test_cancel_names_its_run_and_is_off_without_an_active_one(two_runs):
    workbench, a, gates = two_runs
    followed = Followed()
    out = named(train_tab.reattach(workbench, followed))  # a page opened while A trains
    assert followed.run_id == a and out["cancel"]["value"] == f"Cancel run {a}"
    assert out["cancel"]["interactive"] is True and out["timer"].active
    gates[0].release()
    workbench.store.spawned[0].wait(timeout=30)
    out = named(train_tab.on_tick(workbench, followed, out["view"]))
    assert "completed" in out["status"] and out["cancel"] == gr.update(interactive=False)
    assert out["timer"].active is False
