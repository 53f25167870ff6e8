"""bench.inspection's table, goals and summary read the rows a measurement writes."""

from __future__ import annotations

from prefixlab.bench.inspection import goals, markdown_table, summarize


def _row(case: str, agreement: float, f1: float, start_f1: float | None, sinks: int) -> dict:
    reading = {"text": "t", "agreement": agreement, "macro_f1": f1}
    return {"case": case, "n": 300, "seed": 0, "readable_s": 90.0,
            "readable": {**reading, "prefix_macro_f1": 0.8, "steps": 15, "baselines": {
                "start_text": None if start_f1 is None else
                {"text": "s", "agreement": 0.5, "macro_f1": start_f1},
                "nearest_tokens": {"text": "n", "agreement": 0.4, "macro_f1": 0.3}}},
            "sinks": [{"slot": 0, "evidence": "e"}] * sinks,
            "described": {"named": 2, "beyond_start": 1, "total": 10, "texts": []}}


def test_goals_say_met_or_missed_with_the_figures():
    rows = [_row("polarity", 0.85, 0.7, 0.6, 0), _row("disaster", 0.7, 0.5, 0.55, 1),
            _row("davidson", 0.9, 0.4, None, 0)]
    said = goals(rows)
    assert "agreement >= 0.8 on polarity: met (0.85)" in said
    assert "agreement >= 0.8 on disaster: missed (0.70)" in said
    assert any(s.startswith("readable above the start text's macro-F1 on disaster: missed")
               for s in said)
    # a run that did not start from text has no start-text baseline to beat
    assert not any("on davidson" in s and "above" in s for s in said)


def test_table_has_a_line_per_run_and_the_summary_counts_sinks_and_names():
    rows = [_row("polarity", 0.85, 0.7, 0.6, 0), _row("disaster", 0.7, 0.5, 0.55, 1)]
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "| P0 |" in table[-1] and "| none |" in table[-2]
    line = summarize(rows)
    assert line.startswith("inspection: runs=2 ")
    assert "sink_share=0.50" in line and "named=4/20" in line and "above_start=1/2" in line


def test_the_benchmark_trains_reads_and_tabulates_a_run_on_a_tiny_model(tmp_path, monkeypatch,
                                                                         capsys):
    from prefixlab.bench.inspection import main
    from tests.conftest import save_tiny_model

    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "polarity_sentences.csv").write_text("text,label\n" + "".join(
        f"the film was {'great' if i % 2 else 'dull'} number {i},"
        f"{'positive' if i % 2 else 'negative'}\n" for i in range(80)))
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "rows.json"
    assert main(["--data-dir", str(data), "--sets", "polarity", "--sizes", "40",
                 "--test-rows", "10", "--model", str(model), "--readable-tokens", "4",
                 "--readable-steps", "2", "--knockout-rows", "4", "--set", "training.epochs=1",
                 "--readable-seconds", "0", "--keep", str(tmp_path / "runs"),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| polarity | 40 | 0 |" in printed
    assert "readable above the start text's macro-F1 on polarity" in printed
    assert printed.strip().splitlines()[-1].startswith("inspection: runs=1 ")
    row = __import__("json").loads(out.read_text())["rows"][0]
    assert row["readable"]["steps"] == 2 and len(row["readable"]["tokens"]) == 4
    assert row["knockout_rows"] == 4 and row["described"]["total"] > 0
    assert main(["--table", str(out)]) == 0  # the table again from the file
    # the kept run read again without training: the same run, its knockout reused
    again = tmp_path / "again.json"
    assert main(["--data-dir", str(data), "--sets", "polarity", "--sizes", "40",
                 "--test-rows", "10", "--model", str(model), "--readable-tokens", "4",
                 "--readable-steps", "2", "--knockout-rows", "4", "--readable-seconds", "0",
                 "--reread", str(tmp_path / "runs"), "--output", str(again)]) == 0
    reread = __import__("json").loads(again.read_text())["rows"][0]
    assert reread["train_s"] is None and reread["val_macro_f1"] == row["val_macro_f1"]
    assert reread["sinks"] == row["sinks"]
