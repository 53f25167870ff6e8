"""A per-key cache: each value computed once, by the first thread that asks for it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A cache whose values are computed once per key, each by the first thread that asks.

    The thread computing one key holds no lock that others need: requests for other keys
    proceed at once (a reference bank being built for one model does not stall scoring with
    another run), and requests for the same key wait for that one computation instead of
    starting another. A computation that fails is not kept; the next request tries again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dict for microseconds, never a computation
        self._futures: dict[K, Future] = {}

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            future = self._futures.get(key)
            mine = future is None
            if mine:
                future = self._futures[key] = Future()
        if mine:
            try:
                future.set_result(compute())
            except BaseException as e:
                with self._lock:
                    if self._futures.get(key) is future:
                        del self._futures[key]
                future.set_exception(e)
                raise
        return future.result()

    def peek(self, key: K) -> V | None:
        """The value if it is computed already (and did not fail), else None; never waits."""
        with self._lock:
            future = self._futures.get(key)
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def drop(self, stale: Callable[[K], bool]) -> None:
        """Forget the keys `stale` names (their values are freed once no caller holds them)."""
        with self._lock:
            for key in [k for k in self._futures if stale(k)]:
                del self._futures[key]
