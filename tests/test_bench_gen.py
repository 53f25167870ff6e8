"""The E2E benchmark's code paths on a tiny model saved as a local folder (the decoders it
compares are tested against hand-written references in test_decode.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from prefixlab.bench.generation import main
from tests.test_cli_generation import MRS


def _e2e_like(folder) -> None:
    rows = [{"input": mr, "target": f"{mr.split('[')[1].split(']')[0]} is fine, says {k}."}
            for mr in MRS * 2 for k in range(2)]
    pd.DataFrame(rows).to_csv(folder / "e2e_dev.csv", index=False)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # --threads sets torch's process-wide count
    yield
    torch.set_num_threads(threads)


def test_the_benchmark_prints_quality_and_speed_side_by_side(tmp_path, model_dir, capsys,
                                                           keep_threads):
    _e2e_like(tmp_path)
    args = ["--data-dir", str(tmp_path), "--model", str(model_dir), "--train-rows", "8",
            "--test-inputs", "2", "--speed-inputs", "2", "--beams", "1,2", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bare" in out and "anchor" in out and "CPU-s ratio" in out
    summary = out.splitlines()[-1]
    for key in ("bleu_prefix=", "gen_speedup_beam1=", "gen_speedup_beam2=", "peak_rss_gb="):
        assert key in summary
    # decode.py and transformers' generate search alike: the same outputs
    assert out.count(" 100%") == 2

    assert main([*args, "--speed-inputs", "0", "--beams", "1"]) == 0  # quality alone
    out = capsys.readouterr().out
    assert "not measured" in out and "gen_speedup" not in out and "bleu_prefix=" in out

    assert main([*args, "--speed-only", "--speed-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "BLEU" not in out and "fastest of 1 runs each, 1 torch threads" in out
    assert out.splitlines()[-1].startswith("summary: gen_speedup_beam1=")
