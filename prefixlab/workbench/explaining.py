"""The explaining room: what a run's prefix does to each decision (one typed text under the
prefix, its start and the bare model, word by word), the words that move its decisions over
validation rows beside TF-IDF's, and the model's own descriptions of the prefix.

The start, the word lists and the descriptions are kept per prefix file (a run trained longer
gets new ones); a typed text is explained afresh each time (one mixed batch, ~1 s).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from prefixlab.interpret.describe import CAVEAT as DESCRIBE_CAVEAT
from prefixlab.interpret.describe import Description, beyond_start
from prefixlab.interpret.explain import METHOD, Explanation
from prefixlab.runs.explanation import (
    EXPLAIN_ROWS,
    SOURCE_NAMES,
    WordAgreement,
    describe_run,
    explain_text,
    word_agreement,
)
from prefixlab.runs.finished import Run
from prefixlab.runs.inspection import run_start
from prefixlab.runs.start import Start
from prefixlab.workbench.memo import Memo


def probability_rows(ex: Explanation) -> pd.DataFrame:
    """One row per reading (prefix, start, bare): its decision and every label's probability."""
    return pd.DataFrame([{"reading": SOURCE_NAMES.get(name, name),
                          "decides": ex.labels[ex.decision(name)],
                          **{f"p({label})": round(float(p), 4)
                             for label, p in zip(ex.labels, probs, strict=True)}}
                         for name, probs in ex.probs.items()])


def descriptions_frame(described: list[Description]) -> pd.DataFrame:
    return pd.DataFrame([{"layers kept": d.layers, "prompt": d.prompt + " …",
                          "the model's continuation": d.text,
                          "names": ", ".join(d.named) or "—"} for d in described])


def words_frame(agreement: WordAgreement) -> pd.DataFrame:
    """One row per rank: per label, the prefix's word (push) and TF-IDF's word."""
    rows = []
    n = max([len(v) for v in agreement.prefix.top.values()]
            + [len(v) for v in agreement.tfidf.values()] + [0])
    for i in range(n):
        row = {"rank": i + 1}
        for label in agreement.prefix.labels:
            top, tfidf = agreement.prefix.top[label], agreement.tfidf[label]
            row[f"{label}: prefix"] = (f"{top[i][0]} ({top[i][1]:+.3f})" if i < len(top)
                                       else "")
            row[f"{label}: TF-IDF"] = tfidf[i] if i < len(tfidf) else ""
        rows.append(row)
    return pd.DataFrame(rows)


class ExplainRoom:
    """Set up by Workbench.__init__: `_explaining`; `open` comes from the runs room."""

    _explaining: Memo[tuple, object]
    open: Callable[[str], Run]

    def _kept(self, what: str, run_id: str, make: Callable[[], object], *more) -> object:
        """`make()` kept per run, prefix file and `more`; older prefix files' are dropped."""
        mtime = self.open(run_id).folder.prefix_path.stat().st_mtime
        self._explaining.drop(lambda k: k[1] == run_id and k[2] != mtime)
        return self._explaining.get((what, run_id, mtime, *more), make)

    def start_of(self, run_id: str) -> Start:
        """Where the run's prefix started (runs.start), kept per prefix file."""
        run = self.open(run_id)
        return self._kept("start", run_id, lambda: run_start(run))

    def explain(self, run_id: str, text: str) -> Explanation:
        """One text under the run's prefix, its start and the bare model, each word left out
        under the prefix and the bare model (runs.explanation.explain_text)."""
        return explain_text(self.open(run_id), self.start_of(run_id).kv, text)

    def word_agreement(self, run_id: str, rows: int = EXPLAIN_ROWS,
                       progress: Callable[[str], None] | None = None) -> WordAgreement:
        """The words that move the prefix's decisions over `rows` validation rows, beside
        TF-IDF's heaviest (kept per prefix file and row count)."""
        run = self.open(run_id)
        return self._kept("words", run_id, lambda: word_agreement(run, rows, progress=progress),
                          rows)

    def describe(self, run_id: str) -> list[Description]:
        """The model's greedy descriptions of the run's prefix per layer range."""
        run = self.open(run_id)
        return self._kept("describe", run_id,
                          lambda: describe_run(run, self.start_of(run_id).kv))


__all__ = ["DESCRIBE_CAVEAT", "METHOD", "ExplainRoom", "Explanation", "beyond_start",
           "descriptions_frame", "probability_rows", "words_frame"]
