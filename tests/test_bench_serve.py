"""The serving benchmark runs end to end on a tiny model: every mode, the sweep by client
count, and contenders that agree (its figures are measured in README, not asserted here)."""

from __future__ import annotations

import re

from prefixlab.bench import serving
from prefixlab.bench.serving import main
from tests.conftest import tiny_model
from tests.test_peft_interop import tolerate_peft_deprecations


@tolerate_peft_deprecations
def test_bench_serve_prints_every_mode_and_the_sweep(tmp_path, tokenizer, capsys,
                                                     monkeypatch):
    monkeypatch.setattr(serving, "LABELS", ["positive", "negative"])  # one token each
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["--model", str(folder), "--prefixes", "3", "--prefix-length", "3",
                 "--requests", "6", "--clients", "2", "--rounds", "2", "--window-ms", "1",
                 "--sweep", "1,3", "--sweep-requests", "4"]) == 0
    out = capsys.readouterr().out
    for mode in ("mixed", "shared", "one-at-a-time", "peft", "peft-onednn"):
        assert re.search(rf"^{mode} +\d+\.\d +\d+ +\d+$", out, re.M), mode
    sweep = out[out.index("throughput by load"):]
    for clients in (1, 3):  # mixed and peft side by side at each client count
        assert re.search(rf"^ +{clients}  +[\d.]+ +\d+ +\d+ +[\d.]+ +\d+ +\d+ +[\d.]+x$", sweep,
                         re.M), clients
    assert float(re.search(r"largest probability gap (\S+)", out).group(1)) < 1e-4
    assert re.search(r"^summary: mixed_vs_shared=[\d.]+ mixed_vs_one=[\d.]+ mixed_vs_peft=[\d.]+"
                     r" mixed_vs_peft_onednn=[\d.]+ mixed_rps=", out, re.M)
