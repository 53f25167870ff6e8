"""The serving room: scoring, generation and batch prediction with any runs' prefixes. Score
and generate requests go through one batcher per base model, so requests naming different
runs (from the Playground or API clients) share mixed batches."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prefixlab.data.reading import read_table
from prefixlab.data.writing import write_csv
from prefixlab.engine.decode import DecodeConfig, Sampling
from prefixlab.engine.models import LoadedModel
from prefixlab.runs.evaluate import classification_report
from prefixlab.runs.finished import (
    Run,
    evaluate_csv,
    label_column_of,
    predict_table,
    text_column_of,
)
from prefixlab.runs.folder import RunError
from prefixlab.runs.generation import evaluate_pairs_csv
from prefixlab.runs.registry import RunStore
from prefixlab.serve.batcher import Batcher, column_groups, predict_frame
from prefixlab.serve.store import PrefixStore
from prefixlab.workbench.memo import Memo


@dataclass
class BatchPrediction:
    """A predicted CSV and what a person should know about it."""

    path: Path  # named after the input: <input stem>-predictions.csv
    rows: int
    label_column: str | None  # gold labels found in the file, if any
    report: dict | None  # metrics against that column (rows with a label the run knows)
    skipped: int  # rows whose gold label is empty or unknown to the run (not in the metrics)
    neutralized: int  # cells written with a leading ' (see data.write_csv)
    reports: dict[str, dict] = field(default_factory=dict)  # several runs: metrics per run name


def sampling_of(do_sample: bool, seed: int = 0, temperature: float = 1.0,
                top_p: float = 1.0) -> Sampling | None:
    """How a request draws its tokens, from a form's or a script's plain values: None is
    greedy; the same seed gives the same text, whatever else shares the batch."""
    return Sampling(int(seed), float(temperature), float(top_p)) if do_sample else None


PREDICT_CHUNK = 64
"""Rows of a file predicted by several runs between two progress reports."""


def predict_frame_in_chunks(loaded: LoadedModel, prefixes: list, frame: pd.DataFrame,
                            column: str, progress: Callable[[str, int, int], None] | None
                            ) -> pd.DataFrame:
    """predict_frame, PREDICT_CHUNK rows at a time when someone follows the progress."""
    if progress is None or frame.empty:
        return predict_frame(loaded, prefixes, frame, column)
    parts = []
    progress("predicting", 0, len(frame))
    for start in range(0, len(frame), PREDICT_CHUNK):
        parts.append(predict_frame(loaded, prefixes, frame.iloc[start:start + PREDICT_CHUNK],
                                   column))
        progress("predicting", min(start + PREDICT_CHUNK, len(frame)), len(frame))
    return pd.concat(parts)


class ServingRoom:
    """Set up by Workbench.__init__: `store`, `exports_dir`, `_batchers`, `batch_window_s`,
    `batch_max_rows`; `model` and `open` come from the models and runs rooms."""

    store: RunStore
    exports_dir: Path
    _batchers: Memo[str, Batcher]
    batch_window_s: float  # how long a request waits for company
    batch_max_rows: int
    default_model: str
    model: Callable[..., LoadedModel]
    open: Callable[[str], Run]

    def serving(self, model: str | None = None) -> Batcher:
        """The batcher of one base model: requests naming any of its runs meet in mixed
        batches (prefixlab.serve.batcher); prefixes load on demand into the store's LRU."""
        name = model or self.default_model

        def start() -> Batcher:
            loaded = self.model(name)
            store = PrefixStore(loaded, locate=lambda run_id: self.store.folder(run_id).path)
            return Batcher(loaded, store, self.batch_window_s, self.batch_max_rows)

        return self._batchers.get(name, start)

    def _batcher_of(self, run_id: str) -> Batcher:
        self.store.folder(run_id)  # RunError for anything that is not a run id
        return self.serving(self.store.get(run_id).model)  # RunError for an unknown id

    def compare(self, texts: list[str], run_ids: list[str], bare: bool = True) -> pd.DataFrame:
        """One row per text and source (each prefix, and the bare model once per distinct
        prompt and label set):
        the predicted label and every label's probability. All runs' requests go in at once,
        so they share mixed batches."""
        pending, bare_runs = [], {}
        for run_id in run_ids:
            batcher = self._batcher_of(run_id)
            name = self.store.get(run_id).name
            pending.append((f"prefix: {name}", batcher.submit_score(run_id, texts)))
            # Runs that share model, prompt and labels give the bare model the same input:
            # it is scored (and shown) once for them.
            info = self.store.folder(run_id).read_config()
            prompt = (info["run"]["model"], info["run"].get("template"),
                      info["run"].get("max_length"), tuple(info["labels"]))
            bare_runs.setdefault(prompt, (run_id, batcher, name))
        if bare:
            for run_id, batcher, name in bare_runs.values():
                source = ("bare model (zero-shot)" if len(bare_runs) == 1
                          else f"bare model, {name}'s prompt")
                pending.append((source, batcher.submit_score(run_id, texts, with_prefix=False)))
        rows = []
        for source, future in pending:
            scored = future.result()
            labels = scored.prefix.labels
            for text, p in zip(texts, scored.probabilities, strict=True):
                rows.append({"text": text, "source": source,
                             "predicted": labels[int(np.argmax(p))],
                             **{f"p({lab})": round(float(v), 4)
                                for lab, v in zip(labels, p, strict=True)}})
        return pd.DataFrame(rows)

    def says_what(self, text: str, run_ids: list[str], max_new_tokens: int = 20
                  ) -> pd.DataFrame:
        """Which prefix says what: for one text, each run's predicted label, its probability
        and its greedy continuation, all runs in shared mixed batches."""
        pending = []
        for run_id in run_ids:
            batcher = self._batcher_of(run_id)
            pending.append((run_id, batcher.submit_score(run_id, [text]),
                            batcher.submit_generate(run_id, [text], max_new_tokens)))
        rows = []
        for run_id, scored, written in pending:
            s = scored.result()
            p = s.probabilities[0]
            best = int(np.argmax(p))
            rows.append({"run": self.store.get(run_id).name, "predicted": s.prefix.labels[best],
                         "probability": round(float(p[best]), 4),
                         "continuation": written.result()[0], "id": run_id})
        return pd.DataFrame(rows, columns=["run", "predicted", "probability", "continuation",
                                           "id"])

    def generate_texts(self, prompts: list[str], run_ids: list[str], max_new_tokens: int = 40,
                       sampling: Sampling | None = None, num_beams: int = 1) -> list[dict]:
        """Continuations of every prompt under every run (none: the bare model): greedy,
        drawn (`sampling`, each prompt on its own seeded generator) or by beam search. All
        runs' requests share mixed batches, with other clients' too."""
        pending = []
        for run_id in run_ids or [None]:
            batcher = self._batcher_of(run_id) if run_id else self.serving()
            pending.append((run_id, batcher.submit_generate(run_id, prompts, max_new_tokens,
                                                            sampling, num_beams)))
        return [{"run_id": run_id or "", "prompt": prompt, "generated": out}
                for run_id, future in pending
                for prompt, out in zip(prompts, future.result(), strict=True)]

    def generate(self, prompt: str, run_id: str | None, max_new_tokens: int = 40,
                 do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> str:
        """One continuation, greedy or drawn (seeded: the same seed gives the same text); it
        shares a mixed batch with everyone else's requests either way."""
        return self.generate_texts([prompt], [run_id] if run_id else [], max_new_tokens,
                                   sampling_of(do_sample, seed, temperature))[0]["generated"]

    def predict_csv(self, run_ids: str | list[str], path: str | Path,
                    text_column: str | None = None, name: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None
                    ) -> BatchPrediction:
        """Score a CSV and write it back with predictions; every cell neutralized. One run
        adds `predicted_label` and `p_<label>`; several add one column group per run
        (`<run name>: ...`), read in shared mixed batches. When the file has a column of gold
        labels, each run's metrics against it come along. `progress(what, done, total)` after
        each chunk of rows (a progress that raises stops there, before anything is written)."""
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        if not ids:
            raise RunError("name at least one run to predict with")
        runs = [self.open(i) for i in ids]
        if len(runs) > 1 and any(r.is_generation for r in runs):
            raise RunError("batch generation takes one generation run at a time")
        if len(runs) == 1:
            out = predict_table(runs[0], path, text_column, progress)
            groups = [""]
        else:
            models = {r.config.model for r in runs}
            if len(models) > 1:
                raise RunError("runs predicted together must share a base model; these use "
                               + ", ".join(sorted(models)))
            batcher = self._batcher_of(ids[0])
            prefixes = [batcher.store.get(i) for i in ids]
            frame = read_table(path).frame
            column = text_column_of(frame, text_column or runs[0].config.text_column, path,
                                    guess=not text_column)
            out = predict_frame_in_chunks(batcher.loaded, prefixes, frame, column, progress)
            groups = column_groups(prefixes)
        added = [c for c in out.columns if c == "predicted_label" or str(c).startswith("p_")
                 or any(g and str(c).startswith(g) for g in groups)]
        gold_column = label_column_of(runs[0], out.drop(columns=added))
        reports, skipped = {}, 0
        if gold_column is not None:
            gold = out[gold_column].fillna("").astype(str).str.strip()
            for run, group in zip(runs, groups, strict=True):
                known = gold.isin(run.labels)
                skipped = max(skipped, int((~known).sum()))
                if known.any():
                    reports[group.removesuffix(": ") or run.folder.path.name] = \
                        classification_report(gold[known].tolist(),
                                              out.loc[known, f"{group}predicted_label"].tolist(),
                                              run.labels)
        # A folder per call: two users' predictions of same-named files never meet, and the
        # file keeps the input's name for whoever downloads it.
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or path).stem)[:60] or "data"
        folder = self.exports_dir / f"predictions-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        target = folder / f"{stem}-predictions.csv"
        neutralized = write_csv(out, target)
        report = next(iter(reports.values()), None)
        return BatchPrediction(target, len(out), gold_column, report, skipped, neutralized,
                               reports if len(runs) > 1 else {})

    def evaluate_csv(self, run_id: str, path: str | Path,
                     progress: Callable[[str, int, int], None] | None = None) -> dict:
        """The run's prefix and its baselines on a held-out labeled CSV (a generation run:
        beside the bare model on a CSV of inputs and references). `progress(what, done,
        total)` follows each part (a progress that raises stops there)."""
        run = self.open(run_id)
        if run.is_generation:
            return evaluate_pairs_csv(run.loaded.model, run.encoder, run.kv, run.config, path,
                                      progress=progress)
        return evaluate_csv(run, path, progress=progress)

    def generate_side_by_side(self, texts: list[str], run_ids: list[str], bare: bool = True,
                              max_new_tokens: int | None = None,
                              num_beams: int | None = None) -> pd.DataFrame:
        """One row per text and source: each generation run's output, and the bare model's
        on that run's template. Each run decodes as it was trained to, unless
        `max_new_tokens` or `num_beams` is given: then every run decodes with those, and the
        first run's length penalty and stop strings."""
        runs = []
        for run_id in run_ids:
            run, name = self.open(run_id), self.store.get(run_id).name
            if not run.is_generation:
                raise RunError(f"run {name!r} classifies; pick generation runs here (or score "
                               "it above)")
            runs.append((run, name))
        decode = None
        if runs and (max_new_tokens is not None or num_beams is not None):
            first = runs[0][0].config.generation
            decode = DecodeConfig(max_new_tokens=int(max_new_tokens or first.max_new_tokens),
                                  num_beams=int(num_beams or first.num_beams),
                                  length_penalty=first.length_penalty, stop=first.stop)
        rows = []
        for run, name in runs:
            sources = [(f"prefix: {name}", True)]
            if bare:
                sources.append((f"bare model, {name}'s prompt", False))
            for source, with_prefix in sources:
                outputs = run.generate(texts, with_prefix=with_prefix, decode=decode)
                rows += [{"input": t, "source": source, "output": o}
                         for t, o in zip(texts, outputs, strict=True)]
        return pd.DataFrame(rows, columns=["input", "source", "output"])
