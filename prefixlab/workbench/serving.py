"""The serving room: scoring, generation and batch prediction with any runs' prefixes. Score
and generate requests go through one batcher per base model, so requests naming different
runs (from the Playground or API clients) share mixed batches.

Only usable runs answer (prefixlab.serve.store.check_served): completed ones, and cancelled
ones whose prefix their user kept (`keep_run`); every other state is refused by name. A run
classifies (it has labels to score) or generates (a target column): `task_of` says which
without loading a model, so a request naming both kinds can answer each with its own."""

from __future__ import annotations

import math
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
    check_rows,
    evaluate_csv,
    label_column_of,
    predict_table,
    text_column_of,
)
from prefixlab.runs.folder import RunError
from prefixlab.runs.generation import evaluate_pairs_csv
from prefixlab.runs.registry import RunRow, RunStore
from prefixlab.serve.batcher import Batcher, column_groups, predict_frame, results
from prefixlab.serve.limits import Limits
from prefixlab.serve.store import PrefixStore, check_served, served_state
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
                            column: str, progress: Callable[[str, int, int], None] | None,
                            groups: list[str] | None = None) -> pd.DataFrame:
    """predict_frame, PREDICT_CHUNK rows at a time when someone follows the progress."""
    if progress is None or frame.empty:
        return predict_frame(loaded, prefixes, frame, column, groups=groups)
    parts = []
    progress("predicting", 0, len(frame))
    for start in range(0, len(frame), PREDICT_CHUNK):
        parts.append(predict_frame(loaded, prefixes, frame.iloc[start:start + PREDICT_CHUNK],
                                   column, groups=groups))
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
    limits: Limits
    default_model: str
    model: Callable[..., LoadedModel]
    open: Callable[[str], Run]
    runs: Callable[[], list[RunRow]]

    # --- which runs answer, and how ------------------------------------------------------------

    def usable_runs(self) -> list[RunRow]:
        """The runs that answer requests, newest first: completed ones and kept cancelled
        ones (the Playground offers these; an unfinished run's prefix is never used)."""
        return [r for r in self.runs() if self.store.folder(r.id).prefix_path.is_file()
                and served_state(self.store.folder(r.id)) is None]

    def check_usable(self, run_id: str) -> None:
        """PrefixStoreError naming the run and its state unless it answers requests (RunError
        for anything that is not one of our run ids)."""
        folder = self.store.folder(run_id)  # RunError for anything that is not a run id
        self.store.get(run_id)  # RunError for an unknown id
        check_served(folder, run_id)

    def task_of(self, run_id: str) -> str:
        """"classify" or "generate", from the run's config (no model loaded)."""
        folder = self.store.folder(run_id)  # RunError for anything that is not a run id
        self.store.get(run_id)  # RunError for an unknown id
        return "generate" if folder.read_config().get("task") == "generation" else "classify"

    def run_facts(self, row: RunRow) -> dict:
        """What a client needs to pick runs: the task, the labels (empty for a generation
        run) and whether the run answers requests now."""
        folder = self.store.folder(row.id)
        try:
            info = folder.read_config()
        except (RunError, ValueError, OSError):
            return {"task": None, "labels": [], "usable": False}
        return {"task": "generate" if info.get("task") == "generation" else "classify",
                "labels": [str(x) for x in info.get("labels") or []],
                "usable": folder.prefix_path.is_file() and served_state(folder) is None}

    def keep_run(self, run_id: str) -> str:
        """Keep a cancelled run's prefix for use: it is then served, scored and offered like
        a completed run's, until a newer prefix replaces it. Returns the run's name."""
        row = self.store.get(run_id)
        self.store.folder(run_id).keep_prefix()
        return row.name

    def _unscorable(self, run_ids: list[str]) -> dict[str, str]:
        """Each generation run among `run_ids`, with why it is not scored."""
        return {run_id: f"run {self.store.get(run_id).name!r} ({run_id}) generates text: it "
                        "has no labels to score"
                for run_id in run_ids if self.task_of(run_id) == "generate"}

    def serving(self, model: str | None = None) -> Batcher:
        """The batcher of one base model: requests naming any of its runs meet in mixed
        batches (prefixlab.serve.batcher); prefixes load on demand into the store's LRU."""
        name = model or self.default_model

        def start() -> Batcher:
            loaded = self.model(name)
            store = PrefixStore(loaded, locate=lambda run_id: self.store.folder(run_id).path)
            return Batcher(loaded, store, self.batch_window_s, self.batch_max_rows,
                           self.limits)

        return self._batchers.get(name, start)

    def _batcher_of(self, run_id: str) -> Batcher:
        self.store.folder(run_id)  # RunError for anything that is not a run id
        return self.serving(self.store.get(run_id).model)  # RunError for an unknown id

    def compare(self, texts: list[str], run_ids: list[str], bare: bool = True,
                stop: Callable[[], bool] | None = None) -> pd.DataFrame:
        """One row per text and source (each prefix, and the bare model once per distinct
        prompt and label set): the run read (`run_id`), the predicted label and every label's
        probability. All runs' requests go in at once, so they share mixed batches. Every
        run must classify (a generation run is refused by name: see score_records).
        `stop()` is asked while the batches run: True abandons the request (see
        serve.batcher.results)."""
        wrong = self._unscorable(run_ids)
        if wrong:
            raise RunError("; ".join(wrong.values()) + ". Score classification runs.")
        for run_id in run_ids:
            self.check_usable(run_id)
        pending, bare_runs = [], {}
        for run_id in run_ids:
            batcher = self._batcher_of(run_id)
            name = self.store.get(run_id).name
            pending.append((f"prefix: {name}", run_id, batcher.submit_score(run_id, texts)))
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
                pending.append((source, run_id,
                                batcher.submit_score(run_id, texts, with_prefix=False)))
        rows = []
        answers = results([future for _, _, future in pending], stop)
        for (source, run_id, _), scored in zip(pending, answers, strict=True):
            labels = scored.prefix.labels
            for text, p in zip(texts, scored.probabilities, strict=True):
                rows.append({"text": text, "source": source, "run_id": run_id,
                             "predicted": labels[int(np.argmax(p))],
                             **{f"p({lab})": round(float(v), 4)
                                for lab, v in zip(labels, p, strict=True)}})
        return pd.DataFrame(rows)

    def score_records(self, texts: list[str], run_ids: list[str], bare: bool = False,
                      stop: Callable[[], bool] | None = None) -> list[dict]:
        """The API's /score: compare's rows for the classification runs named, then one row
        `{run_id, source: "skipped", error}` per generation run named (it has no labels):
        a request naming both kinds is answered for the runs that can answer it. Refused
        when no run named classifies, or when one to score is unfinished (named, with its
        state). A row carries its own run's labels only: never NaN for another run's."""
        wrong = self._unscorable(run_ids)
        right = [run_id for run_id in run_ids if run_id not in wrong]
        if not right:
            raise RunError("no run named classifies: " + "; ".join(wrong.values())
                           + ". Generate with them (/generate), or name a classification run.")
        skipped = [{"run_id": run_id, "source": "skipped",
                    "error": f"{why}; generate with it (/generate)"}
                   for run_id, why in wrong.items()]
        rows = self.compare(texts, right, bare=bare, stop=stop).to_dict("records")
        # JSON has no NaN: a label another run has is absent from this run's rows.
        return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                for row in rows] + skipped

    def says_what(self, text: str, run_ids: list[str], max_new_tokens: int = 20
                  ) -> pd.DataFrame:
        """Which prefix says what: for one text, each run's predicted label, its probability
        and its greedy continuation, all runs in shared mixed batches."""
        wrong = self._unscorable(run_ids)
        if wrong:
            raise RunError("; ".join(wrong.values()) + ". Ask classification runs here.")
        for run_id in run_ids:
            self.check_usable(run_id)
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
                       sampling: Sampling | None = None, num_beams: int = 1,
                       raw: bool = False, stop: Callable[[], bool] | None = None
                       ) -> list[dict]:
        """Continuations of every prompt under every run (none: the bare model): greedy,
        drawn (`sampling`, each prompt on its own seeded generator) or by beam search. All
        runs' requests share mixed batches, with other clients' too. A generation run writes
        each prompt into its template and ends at its stop strings, as its reports do,
        unless `raw`; a classification run's prefix continues the prompt as given (its
        template ends where a label goes: score_records answers that)."""
        for run_id in run_ids:
            self.check_usable(run_id)
        pending = []
        for run_id in run_ids or [None]:
            batcher = self._batcher_of(run_id) if run_id else self.serving()
            pending.append((run_id, batcher.submit_generate(run_id, prompts, max_new_tokens,
                                                            sampling, num_beams, raw=raw)))
        answers = results([future for _, future in pending], stop)
        return [{"run_id": run_id or "", "prompt": prompt, "generated": out}
                for (run_id, _), texts in zip(pending, answers, strict=True)
                for prompt, out in zip(prompts, texts, strict=True)]

    def generate(self, prompt: str, run_id: str | None, max_new_tokens: int = 40,
                 do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                 raw: bool = False) -> str:
        """One continuation, greedy or drawn (seeded: the same seed gives the same text); it
        shares a mixed batch with everyone else's requests either way. A generation run
        reads the prompt in its template unless `raw` (see generate_texts)."""
        return self.generate_texts([prompt], [run_id] if run_id else [], max_new_tokens,
                                   sampling_of(do_sample, seed, temperature),
                                   raw=raw)[0]["generated"]

    def predict_csv(self, run_ids: str | list[str], path: str | Path,
                    text_column: str | None = None, name: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None
                    ) -> BatchPrediction:
        """Score a CSV and write it back with predictions; every cell neutralized. One run
        adds `predicted_label` and `p_<label>` (a generation run: `generated`); several add
        one column group per run (`<run name>: ...`), classification runs read in shared
        mixed batches, generation runs decoded as their reports decode. When the file has a
        column of gold labels, each classification run's metrics against it come along.
        `progress(what, done, total)` after each chunk of rows (a progress that raises stops
        there, before anything is written)."""
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        if not ids:
            raise RunError("name at least one run to predict with")
        for run_id in ids:
            self.check_usable(run_id)
        runs = [self.open(i) for i in ids]
        if len(runs) == 1:
            out = predict_table(runs[0], path, text_column, progress,
                                max_rows=self.limits.csv_rows)
            groups = [""]
            added = [c for c in out.columns if c in ("predicted_label", "generated")
                     or str(c).startswith("p_")]
        else:
            models = {r.config.model for r in runs}
            if len(models) > 1:
                raise RunError("runs predicted together must share a base model; these use "
                               + ", ".join(sorted(models)))
            batcher = self._batcher_of(ids[0])
            prefixes = [batcher.store.get(i) for i in ids]
            frame = read_table(path).frame
            check_rows(frame, self.limits.csv_rows)
            # The texts' column: asked for, else the first classification run's (or the first
            # run's), else a guess.
            first = next((r for r in runs if not r.is_generation), runs[0])
            column = text_column_of(frame, text_column or first.config.text_column, path,
                                    guess=not text_column)
            groups = column_groups(prefixes)
            scoring = [(p, g) for p, g in zip(prefixes, groups, strict=True)
                       if p.encoder is not None]
            out = frame.copy()
            if scoring:
                out = predict_frame_in_chunks(batcher.loaded, [p for p, _ in scoring], frame,
                                              column, progress, groups=[g for _, g in scoring])
            texts = frame[column].fillna("").astype(str).tolist()
            added = []
            for run, group in zip(runs, groups, strict=True):
                if run.is_generation:
                    out[f"{group}generated"] = run.generate(texts)
                    added.append(f"{group}generated")
                else:
                    added += [f"{group}predicted_label"] + [f"{group}p_{lab}"
                                                           for lab in run.labels]
            out = out[[*frame.columns, *added]]  # each run's group in the order named
        classifiers = [(r, g) for r, g in zip(runs, groups, strict=True) if not r.is_generation]
        gold_column = (label_column_of(classifiers[0][0], out.drop(columns=added))
                       if classifiers else None)
        reports, skipped = {}, 0
        if gold_column is not None:
            gold = out[gold_column].fillna("").astype(str).str.strip()
            for run, group in classifiers:
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
        self.check_usable(run_id)
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
            self.check_usable(run_id)
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
