"""The hostile probe (prefixlab.bench.hostile) against this checkout's server: every probe
class ends answered or clearly refused, none crashes or hangs."""

from __future__ import annotations

import json

from prefixlab.bench import hostile


def test_answers_are_judged_by_what_a_person_reads():
    assert hostile._readable('{"error": "texts must be a list of strings"}')
    assert not hostile._readable('{"error": "Something went wrong (KeyError: 3)"}')
    assert not hostile._readable("<gradio.components.api_component.Api object at 0x7f>")
    assert hostile._judge('[{"p": NaN}]', 0.0, "answer").outcome == "crash"
    assert hostile._judge('[{"p": 0.5}]', 0.0, "answer").outcome == "correct"
    assert hostile._judge('[{"p": 0.5}]', 0.0, "refuse").outcome == "accepted"


def test_every_probe_class_is_answered_or_clearly_refused(model_dir, capsys):
    assert hostile.main(["--model", str(model_dir), "--skip", "load,beside", "--timeout", "60",
                         "--max-texts", "200"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.split("json: ", 1)[1])
    outcomes = report["probes"]
    assert len(outcomes) == len(hostile.probes(["a", "b"], 10, 10))
    bad = {name: o for name, o in outcomes.items() if o not in ("correct", "clear")}
    assert not bad, bad
    assert report["restarts"] == 0
