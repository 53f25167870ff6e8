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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, wait
from contextlib import suppress
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from prefixlab.engine.decode import Sampling, cut_at_stop, decode_memory, mixed_generate
from prefixlab.engine.mixed import mixed_score_labels
from prefixlab.engine.models import LoadedModel
from prefixlab.errors import PrefixLabError
from prefixlab.serve import limits
from prefixlab.serve.limits import Limits, RequestError
from prefixlab.serve.store import PrefixStore, ServedPrefix

DEFAULT_WINDOW_S = 0.005  # long enough for concurrent clients to meet, short next to a forward
DEFAULT_MAX_ROWS = 32  # texts per mixed batch: larger batches gain little on CPU


class ServeError(PrefixLabError, ValueError):
    """A request that cannot be served as asked (no texts, a prefix without labels, ...)."""


class Abandoned(ServeError):
    """A request whose client went away: its work stopped after the chunk it was in."""


def results(futures: Sequence[Future], stop: Callable[[], bool] | None = None,
            poll_s: float = 0.25) -> list:
    """The futures' results in order. `stop()` is asked every `poll_s` while they run: when it
    says True (the client disconnected or cancelled), every future is cancelled, so the
    batcher drops their remaining chunks, and Abandoned is raised."""
    if stop is not None:
        while wait(futures, timeout=poll_s).not_done:
            if stop():
                for future in futures:
                    future.cancel()
                raise Abandoned("the client went away; the rest of its request was not run")
    return [future.result() for future in futures]


@dataclass(frozen=True)
class Scored:
    """One request's answer: every text's label probabilities under one prefix."""

    prefix: ServedPrefix
    with_prefix: bool  # False: the bare model read the prefix's prompt
    probabilities: list[np.ndarray]  # per text, (K,) in prefix.labels order


@dataclass
class _Request:
    """A client's request, validated and tokenized before it joins any batch. Its rows run a
    chunk at a time (`take`): a large request goes back in line after each chunk."""

    kind: str  # "score" or "generate"
    key: str | None  # None: the bare model (generation only)
    texts: list[str]
    prefix: ServedPrefix | None = None
    prompts: list = field(default_factory=list)  # per text: ScoreItem, or token ids to continue
    with_prefix: bool = True
    max_new_tokens: int = 40
    sampling: Sampling | None = None  # None: greedy (or beam search)
    num_beams: int = 1
    length_penalty: float = 1.0
    raw: bool = False  # True: a generation run's prompt as given, without its template
    row_bytes: int = 0  # decode memory of one of its rows (with its beams), estimated
    future: Future = field(default_factory=Future)
    done: int = 0  # rows answered
    results: list = field(default_factory=list)

    def take(self, most: int) -> tuple[int, int]:
        """The rows [start, stop) of its next chunk."""
        return self.done, min(len(self.texts), self.done + most)

    @property
    def finished(self) -> bool:
        return self.done >= len(self.texts) or self.future.done()


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    failed: int = 0
    retried: int = 0  # batches that failed and were run again request by request

    @property
    def mean_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class Batcher:
    """Collects requests for any prefixes of one model and runs them as mixed batches.

    A request is checked and tokenized in its client's thread (`submit_*`), so nothing one
    client sends can fail a batch it shares; a batch that fails anyway (out of memory, say) is
    run again request by request, so only the request that cannot run fails. A request over
    `max_rows` rows runs a quarter of `max_rows` at a time and then waits in line behind
    whoever came meanwhile: a 1-text request waits for one such chunk at most, and a request
    whose future is cancelled (its client went away) stops after the chunk it is in.
    Generation batches stay under the limits' decode-memory budget, split when they would
    not."""

    def __init__(self, loaded: LoadedModel, store: PrefixStore,
                 window_s: float = DEFAULT_WINDOW_S, max_rows: int = DEFAULT_MAX_ROWS,
                 limits: Limits | None = None) -> None:
        if store.loaded is not loaded:
            raise ValueError("the store must serve the batcher's own loaded model")
        self.loaded = loaded
        self.store = store
        self.window_s = window_s
        self.max_rows = max_rows
        self.limits = limits or Limits()
        self.stats = BatcherStats()
        self._stats_lock = threading.Lock()  # two workers and the clients count
        # Scoring and generation each have a line and a worker: a 1-text score never waits
        # for a decode of hundreds of tokens (they share the cores, not a turn).
        self._queues: dict[str, queue.Queue[_Request | None]] = {
            kind: queue.Queue() for kind in ("score", "generate")}
        self._threads = [threading.Thread(target=self._loop, args=(line,), daemon=True,
                                          name=f"prefix-batcher-{kind}")
                         for kind, line in self._queues.items()]
        for thread in self._threads:
            thread.start()

    # --- clients ------------------------------------------------------------------------------

    def submit_score(self, key: str, texts: Sequence[str], with_prefix: bool = True
                     ) -> Future:
        """A future of `Scored` for `texts` under prefix `key` (or its bare prompt)."""
        request = _Request("score", key, self._texts(texts, "texts"), with_prefix=with_prefix)
        return self._submit(request)

    def submit_generate(self, key: str | None, prompts: Sequence[str], max_new_tokens: int = 40,
                        sampling: Sampling | None = None, num_beams: int = 1,
                        length_penalty: float = 1.0, raw: bool = False) -> Future:
        """A future of the continuations (list[str]) of `prompts` after prefix `key`: greedy,
        drawn (`sampling`: prompt j on its own generator, `sampling.for_row(j)`), or the best
        of `num_beams` beams. A generation run reads each prompt as an input in its template
        and its text ends at its stop strings, stripped; `raw` continues the prompt as
        given (so does every other prefix, and the bare model)."""
        max_new_tokens = limits.whole(max_new_tokens, "max_new_tokens", 1,
                                      self.limits.new_tokens, "new_tokens")
        num_beams = limits.whole(num_beams, "num_beams", 1, 16)
        length_penalty = limits.number(length_penalty, "length_penalty")
        if sampling is not None and num_beams > 1:
            raise ServeError("choose sampling or beam search, not both")
        texts = self._texts(prompts, "prompts")
        if len(texts) * num_beams > self.limits.rows_generated:
            raise RequestError(f"{len(texts)} prompts × {num_beams} beams is "
                               f"{len(texts) * num_beams} rows; this server decodes at most "
                               f"{self.limits.rows_generated} per request "
                               f"({limits.env_name('rows_generated')}): send fewer prompts or "
                               "beams")
        return self._submit(_Request("generate", key, texts, max_new_tokens=max_new_tokens,
                                     sampling=sampling, num_beams=num_beams,
                                     length_penalty=length_penalty, raw=bool(raw)))

    def score(self, key: str, texts: Sequence[str], with_prefix: bool = True) -> Scored:
        return self.submit_score(key, texts, with_prefix).result()

    def generate(self, key: str | None, prompts: Sequence[str], max_new_tokens: int = 40,
                 sampling: Sampling | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, raw: bool = False) -> list[str]:
        return self.submit_generate(key, prompts, max_new_tokens, sampling, num_beams,
                                    length_penalty, raw).result()

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        for line in self._queues.values():
            line.put(None)
        for thread in self._threads:
            thread.join(timeout=60)

    def _texts(self, values: Sequence[str], name: str) -> list[str]:
        """The request's texts as given (blank ones kept: a table's row is still a row),
        each a string within the limits."""
        if isinstance(values, str) or not isinstance(values, Sequence):
            limits.texts(values, name, self.limits)  # raises, naming the type expected
        out = list(values)
        if not out:
            raise ServeError("a request needs at least one text")
        if len(out) > self.limits.texts:
            raise RequestError(f"{name} has {len(out):,} entries; this server takes at most "
                               f"{self.limits.texts:,} per request "
                               f"({limits.env_name('texts')}): send them in several requests")
        for i, text in enumerate(out):
            limits.text(text, f"{name}[{i}]", self.limits)
        return out

    def _submit(self, request: _Request) -> Future:
        if not all(thread.is_alive() for thread in self._threads):
            raise ServeError("the batcher is closed")
        try:
            self._prepare(request)
        except PrefixLabError as e:  # this request alone fails, before it meets any other
            self._count(failed=1)
            request.future.set_exception(e)
            return request.future
        self._queues[request.kind].put(request)
        return request.future

    def _prepare(self, r: _Request) -> None:
        """Resolve the request's prefix and tokenize its texts, in the client's thread."""
        r.prefix = self._resolve(r)
        p = r.prefix
        if r.kind == "score":
            r.prompts = [p.score_item(t, r.with_prefix) for t in r.texts]
            r.prompts = [replace(item, ids=item.prompt()) for item in r.prompts]
            return
        tokenizer = self.loaded.tokenizer
        r.prompts = [p.writer.prompt(t)[0] if not _raw(r, p) else
                     list(tokenizer(t, add_special_tokens=False)["input_ids"]) or
                     [tokenizer.eos_token_id] for t in r.texts]
        config = self.loaded.model.config
        positions = getattr(config, "max_position_embeddings", None)
        slots = 0 if p is None else p.kv.shape[3]
        longest = max(len(ids) for ids in r.prompts)
        if positions and slots + longest + r.max_new_tokens > positions:
            j = max(range(len(r.prompts)), key=lambda i: len(r.prompts[i]))
            raise RequestError(
                f"prompts[{j}] is {longest:,} tokens; with max_new_tokens {r.max_new_tokens} "
                f"after the prefix's {slots} slots that passes the model's {positions:,} "
                "positions: shorten the prompt or ask for fewer new tokens")
        r.row_bytes = decode_memory(config, 1, slots, longest, r.max_new_tokens, r.num_beams)
        if r.row_bytes > self.limits.decode_bytes:
            raise RequestError(
                f"one prompt of {longest:,} tokens with {r.num_beams} beam(s) and "
                f"{r.max_new_tokens} new tokens needs ~{r.row_bytes / 2**20:,.0f} MB to decode; "
                f"this server allows {self.limits.decode_mb:,.0f} MB per batch "
                f"({limits.env_name('decode_mb')}): use fewer beams, fewer new tokens or a "
                "shorter prompt")

    # --- the worker ---------------------------------------------------------------------------

    def _loop(self, line: queue.Queue) -> None:
        while True:
            first = line.get()
            if first is None:
                return self._drain(line)
            batch, rows = [first], self._rows(first)
            deadline = time.monotonic() + self.window_s
            stop = False
            while rows < self.max_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = line.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                rows += self._rows(nxt)
            self._run(batch)
            for r in batch:  # a large request's next chunk waits behind whoever came meanwhile
                if not r.finished:
                    line.put(r)
            if stop:
                return self._drain(line)

    def _rows(self, r: _Request) -> int:
        start, stop = r.take(self._turn(r))
        return stop - start

    def _turn(self, r: _Request) -> int:
        """Rows a request runs per turn: all of them up to max_rows; a larger request a
        quarter of max_rows, so a request arriving meanwhile waits for a small chunk and
        shares its batch with one."""
        return self.max_rows if len(r.texts) <= self.max_rows else max(1, self.max_rows // 4)

    def _drain(self, line: queue.Queue) -> None:
        """Closing: fail what is still in line, so no client waits forever."""
        while True:
            try:
                r = line.get_nowait()
            except queue.Empty:
                return
            if r is not None and not r.future.done():
                r.future.set_exception(ServeError("the server closed before this request ran"))

    def _run(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if not r.future.done()]  # cancelled: its client went away
        for r in batch:
            if r.done == 0:
                self._count(requests=1)
        scoring = [r for r in batch if r.kind == "score"]
        writing = [r for r in batch if r.kind == "generate"]
        if scoring:
            self._guarded(scoring, self._score)
        # Greedy and sampled rows decode together; beam search, one batch per setting.
        settings: dict[tuple, list] = {}
        for r in writing:
            setting = (1,) if r.num_beams == 1 else (r.num_beams, r.length_penalty,
                                                     r.max_new_tokens)
            settings.setdefault(setting, []).append(r)
        for group in settings.values():
            self._guarded(group, self._generate)
        self._count(batches=1)

    def _count(self, **counts: int) -> None:
        with self._stats_lock:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

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

    def _guarded(self, group: list[_Request], run) -> None:
        """Run a group's next chunks; if the batch fails, each request again alone, so only
        one that fails alone gets the error."""
        chunks = [(r, *r.take(self._turn(r))) for r in group]
        try:
            run(chunks)
        except Exception as e:  # a failed forward never stops the worker
            if len(group) == 1:
                self._fail(group[0], e)
                return
            self._count(retried=1)
            for chunk in chunks:
                try:
                    run([chunk])
                except Exception as alone:
                    self._fail(chunk[0], alone)
                else:
                    self._advance([chunk])
            return
        self._advance(chunks)

    def _advance(self, chunks: list[tuple[_Request, int, int]]) -> None:
        for r, start, stop in chunks:
            self._count(rows=stop - start)
            r.done = stop

    def _answered(self, r: _Request, start: int, stop: int, part: list) -> None:
        """Keep a chunk's answers; the last chunk completes the request's future."""
        r.results[start:stop] = part
        if stop >= len(r.texts) and not r.future.done():
            with suppress(InvalidStateError):  # cancelled meanwhile by its client
                r.future.set_result(self._answer(r))

    def _answer(self, r: _Request):
        if r.kind == "score":
            return Scored(r.prefix, r.with_prefix, r.results)
        return r.results if _raw(r, r.prefix) else [_written(t, r.prefix.stop)
                                                     for t in r.results]

    def _fail(self, r: _Request, e: Exception) -> None:
        self._count(failed=1)
        if not r.future.done():
            with suppress(InvalidStateError):
                r.future.set_exception(e)
        r.done = len(r.texts)

    def _score(self, chunks: list[tuple[_Request, int, int]]) -> None:
        items = [item for r, start, stop in chunks for item in r.prompts[start:stop]]
        probs = mixed_score_labels(self.loaded.model, items, batch_size=self.max_rows)
        at = 0
        for r, start, stop in chunks:
            self._answered(r, start, stop, probs[at:at + stop - start])
            at += stop - start

    def _generate(self, chunks: list[tuple[_Request, int, int]]) -> None:
        """Decode the chunks' rows in batches whose estimated memory fits the budget."""
        rows = [(r, j) for r, start, stop in chunks for j in range(start, stop)]
        outputs: dict[tuple[int, int], str] = {}
        for part in self._within_budget(rows):
            first = part[0][0]
            kvs = [None if r.prefix is None else r.prefix.kv for r, _ in part]
            prompts = [r.prompts[j] for r, j in part]
            if first.num_beams > 1:  # the group shares beams, penalty and budget
                out = mixed_generate(self.loaded.model, self.loaded.tokenizer, kvs, prompts,
                                     first.max_new_tokens, num_beams=first.num_beams,
                                     length_penalty=first.length_penalty)
            else:
                budgets = [r.max_new_tokens for r, _ in part]
                sampling = [None if r.sampling is None else r.sampling.for_row(j)
                            for r, j in part]
                out = mixed_generate(self.loaded.model, self.loaded.tokenizer, kvs, prompts,
                                     budgets, sampling)
            outputs.update({(id(r), j): text for (r, j), text in zip(part, out, strict=True)})
        for r, start, stop in chunks:
            self._answered(r, start, stop, [outputs[id(r), j] for j in range(start, stop)])

    def _within_budget(self, rows: list[tuple[_Request, int]]) -> list[list]:
        """The rows in order, cut into batches each under the decode-memory budget (rows are
        padded to the batch's longest prompt and decoded for its largest budget)."""
        config = self.loaded.model.config
        parts: list[list] = [[]]
        longest = slots = new = 0
        for r, j in rows:
            grown = (max(longest, len(r.prompts[j])),
                     max(slots, 0 if r.prefix is None else r.prefix.kv.shape[3]),
                     max(new, r.max_new_tokens))
            need = decode_memory(config, len(parts[-1]) + 1, grown[1], grown[0], grown[2],
                                 r.num_beams)
            if parts[-1] and need > self.limits.decode_bytes:
                parts.append([])
                grown = (len(r.prompts[j]), 0 if r.prefix is None else r.prefix.kv.shape[3],
                         r.max_new_tokens)
            parts[-1].append((r, j))
            longest, slots, new = grown
        return parts


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
