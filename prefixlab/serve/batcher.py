"""Serving many prefixes with one model: a batcher that turns concurrent requests into mixed
batches, and batch prediction of a table under several prefixes at once.

Requests (score some texts, or continue some prompts, under a named prefix) go into a queue.
One worker thread takes the first, waits a short window (a few ms) for more, up to a maximum
number of rows, and runs all of them as one mixed batch (prefixlab.engine.mixed): throughput grows
with load instead of queueing per prefix. Greedy and sampled generation requests decode
together (each sampled row on a generator of its own seed, so its text is what it would be
alone); beam search requests decode together when they share beams, length penalty and budget.
A generation run's prompts are written into its template and its outputs end at its stop
strings, as its reports decode them, unless a request asks for raw text (`raw=True`); other
prefixes continue the text as given.
A request whose prefix is missing, unreadable or made for another model fails alone, with the
store's message; the rest of its batch runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prefixlab.engine.decode import Sampling, cut_at_stop, mixed_generate
from prefixlab.engine.mixed import mixed_score_labels
from prefixlab.engine.models import LoadedModel
from prefixlab.errors import PrefixLabError
from prefixlab.serve.store import PrefixStore, ServedPrefix

DEFAULT_WINDOW_S = 0.005  # long enough for concurrent clients to meet, short next to a forward
DEFAULT_MAX_ROWS = 32  # texts per mixed batch: larger batches gain little on CPU


class ServeError(PrefixLabError, ValueError):
    """A request that cannot be served as asked (no texts, a prefix without labels, ...)."""


@dataclass(frozen=True)
class Scored:
    """One request's answer: every text's label probabilities under one prefix."""

    prefix: ServedPrefix
    with_prefix: bool  # False: the bare model read the prefix's prompt
    probabilities: list[np.ndarray]  # per text, (K,) in prefix.labels order


@dataclass
class _Request:
    kind: str  # "score" or "generate"
    key: str | None  # None: the bare model (generation only)
    texts: list[str]
    with_prefix: bool = True
    max_new_tokens: int = 40
    sampling: Sampling | None = None  # None: greedy (or beam search)
    num_beams: int = 1
    length_penalty: float = 1.0
    raw: bool = False  # True: a generation run's prompt as given, without its template
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    failed: int = 0

    @property
    def mean_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class Batcher:
    """Collects requests for any prefixes of one model and runs them as mixed batches."""

    def __init__(self, loaded: LoadedModel, store: PrefixStore,
                 window_s: float = DEFAULT_WINDOW_S, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if store.loaded is not loaded:
            raise ValueError("the store must serve the batcher's own loaded model")
        self.loaded = loaded
        self.store = store
        self.window_s = window_s
        self.max_rows = max_rows
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="prefix-batcher")
        self._thread.start()

    # --- clients ------------------------------------------------------------------------------

    def submit_score(self, key: str, texts: Sequence[str], with_prefix: bool = True
                     ) -> Future:
        """A future of `Scored` for `texts` under prefix `key` (or its bare prompt)."""
        return self._submit(_Request("score", key, list(texts), with_prefix=with_prefix))

    def submit_generate(self, key: str | None, prompts: Sequence[str], max_new_tokens: int = 40,
                        sampling: Sampling | None = None, num_beams: int = 1,
                        length_penalty: float = 1.0, raw: bool = False) -> Future:
        """A future of the continuations (list[str]) of `prompts` after prefix `key`: greedy,
        drawn (`sampling`: prompt j on its own generator, `sampling.for_row(j)`), or the best
        of `num_beams` beams. A generation run reads each prompt as an input in its template
        and its text ends at its stop strings, stripped; `raw` continues the prompt as
        given (so does every other prefix, and the bare model)."""
        if not 1 <= int(max_new_tokens) <= 1024:
            raise ServeError(f"max_new_tokens must be 1..1024, got {max_new_tokens}")
        if not 1 <= int(num_beams) <= 16:
            raise ServeError(f"num_beams must be 1..16, got {num_beams}")
        if sampling is not None and num_beams > 1:
            raise ServeError("choose sampling or beam search, not both")
        return self._submit(_Request("generate", key, list(prompts),
                                     max_new_tokens=int(max_new_tokens), sampling=sampling,
                                     num_beams=int(num_beams),
                                     length_penalty=float(length_penalty), raw=bool(raw)))

    def score(self, key: str, texts: Sequence[str], with_prefix: bool = True) -> Scored:
        return self.submit_score(key, texts, with_prefix).result()

    def generate(self, key: str | None, prompts: Sequence[str], max_new_tokens: int = 40,
                 sampling: Sampling | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, raw: bool = False) -> list[str]:
        return self.submit_generate(key, prompts, max_new_tokens, sampling, num_beams,
                                    length_penalty, raw).result()

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _submit(self, request: _Request) -> Future:
        if not request.texts:
            raise ServeError("a request needs at least one text")
        if not self._thread.is_alive():
            raise ServeError("the batcher is closed")
        self._queue.put(request)
        return request.future

    # --- the worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, rows = [first], len(first.texts)
            deadline = time.monotonic() + self.window_s
            stop = False
            while rows < self.max_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                rows += len(nxt.texts)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Request]) -> None:
        ready: list[tuple[_Request, ServedPrefix | None]] = []
        for r in batch:
            try:
                ready.append((r, self._resolve(r)))
            except PrefixLabError as e:  # this request alone fails; the batch goes on
                self.stats.failed += 1
                r.future.set_exception(e)
        scoring = [(r, p) for r, p in ready if r.kind == "score"]
        writing = [(r, p) for r, p in ready if r.kind == "generate"]
        if scoring:
            self._guarded(scoring, self._score)
        # Greedy and sampled rows decode together; beam search, one batch per setting.
        settings: dict[tuple, list] = {}
        for r, p in writing:
            setting = (1,) if r.num_beams == 1 else (r.num_beams, r.length_penalty,
                                                     r.max_new_tokens)
            settings.setdefault(setting, []).append((r, p))
        for group in settings.values():
            self._guarded(group, self._generate)
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.rows += sum(len(r.texts) for r, _ in ready)

    def _resolve(self, r: _Request) -> ServedPrefix | None:
        if r.key is None:
            if r.kind == "score":
                raise ServeError("scoring needs a prefix: its run has the labels and prompt")
            return None
        served = self.store.get(r.key)
        if r.kind == "score" and served.encoder is None:
            raise ServeError(f"prefix {r.key!r} has no labels to score (a generation run, or "
                             "an adapter imported without --labels): generate with it instead")
        return served

    @staticmethod
    def _guarded(group, run) -> None:
        try:
            run(group)
        except Exception as e:  # a failed forward fails its requests, never the worker
            for r, _ in group:
                if not r.future.done():
                    r.future.set_exception(e)

    def _score(self, group: list[tuple[_Request, ServedPrefix]]) -> None:
        items = [p.score_item(t, r.with_prefix) for r, p in group for t in r.texts]
        probs = mixed_score_labels(self.loaded.model, items, batch_size=self.max_rows)
        start = 0
        for r, p in group:
            part = probs[start:start + len(r.texts)]
            start += len(r.texts)
            r.future.set_result(Scored(p, r.with_prefix, part))

    def _generate(self, group: list[tuple[_Request, ServedPrefix | None]]) -> None:
        kvs = [None if p is None else p.kv for r, p in group for _ in r.texts]
        prompts = [t if _raw(r, p) else p.writer.prompt(t)[0] for r, p in group for t in r.texts]
        first = group[0][0]
        if first.num_beams > 1:  # the group shares beams, penalty and budget
            out = mixed_generate(self.loaded.model, self.loaded.tokenizer, kvs, prompts,
                                 first.max_new_tokens, num_beams=first.num_beams,
                                 length_penalty=first.length_penalty)
        else:
            budgets = [r.max_new_tokens for r, _ in group for _ in r.texts]
            sampling = [None if r.sampling is None else r.sampling.for_row(j)
                        for r, _ in group for j in range(len(r.texts))]
            out = mixed_generate(self.loaded.model, self.loaded.tokenizer, kvs, prompts,
                                 budgets, sampling)
        start = 0
        for r, p in group:
            texts = out[start:start + len(r.texts)]
            r.future.set_result(texts if _raw(r, p) else [_written(t, p.stop) for t in texts])
            start += len(r.texts)


def _raw(r: _Request, p: ServedPrefix | None) -> bool:
    """Whether a request's prompts are continued as given (no template to write them into)."""
    return r.raw or p is None or p.writer is None


def _written(text: str, stop: Sequence[str]) -> str:
    """A generation run's output as its reports show it (engine.decode.generate_texts): one
    line-break convention, cut at the first stop string, stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return cut_at_stop(text.lstrip(), stop).strip()


def predict_frame(loaded: LoadedModel, prefixes: Sequence[ServedPrefix], frame: pd.DataFrame,
                  column: str, batch_size: int = 32,
                  groups: Sequence[str] | None = None) -> pd.DataFrame:
    """`frame` with one column group per prefix: `<name>: predicted_label`, `<name>: p_<label>`
    (`groups`: the column-name starts, when the caller has named them among more prefixes).

    Every row is read under every prefix in shared mixed batches.
    """
    if not prefixes:
        raise ServeError("name at least one prefix")
    unlabeled = [p.key for p in prefixes if p.encoder is None]
    if unlabeled:
        raise ServeError(f"prefixes without labels cannot predict: {', '.join(unlabeled)}")
    texts = frame[column].fillna("").astype(str).tolist()
    items = [p.score_item(t) for p in prefixes for t in texts]
    probs = mixed_score_labels(loaded.model, items, batch_size=batch_size)
    out = frame.copy()
    groups = column_groups(prefixes) if groups is None else groups
    for i, (p, group) in enumerate(zip(prefixes, groups, strict=True)):
        block = np.stack(probs[i * len(texts):(i + 1) * len(texts)]) if texts else \
            np.zeros((0, len(p.labels)))
        out[f"{group}predicted_label"] = [p.labels[j] for j in block.argmax(1)]
        for j, label in enumerate(p.labels):
            out[f"{group}p_{label}"] = block[:, j].round(6)
    return out


def column_groups(prefixes: Sequence[ServedPrefix]) -> list[str]:
    """Each prefix's column-name start, `<name>: `, with its key added where names repeat."""
    counts: dict[str, int] = {}
    for p in prefixes:
        counts[p.name] = counts.get(p.name, 0) + 1
    return [f"{p.name}: " if counts[p.name] == 1 else f"{p.name} ({p.key}): " for p in prefixes]
