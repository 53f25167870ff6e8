"""The readable-prompt room: a text prompt that decides as a run's prefix does, beside its
start text and its nearest-token text (runs.readable), kept per prefix file and settings and
written to the run folder as readable_prompt.json.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from prefixlab.interpret.readable import SearchConfig
from prefixlab.runs.finished import Run
from prefixlab.runs.readable import (
    DEFAULT_LENGTH,
    SEARCH_SECONDS,
    ReadablePrompt,
    readable_prompt,
    write_readable,
)


def readings_frame(found: ReadablePrompt) -> pd.DataFrame:
    """One row per text prompt: the readable prompt, the start text, the nearest tokens, each
    with its label bias and without."""
    names = {"start_text": "start text", "nearest_tokens": "nearest tokens"}
    rows = [("readable prompt", found.prompt),
            *((names[k], v) for k, v in found.baselines.items())]

    def bias(r) -> str | None:
        return (", ".join(f"{k} {v:+.2f}" for k, v in r.bias.items())
                if r and r.bias is not None else None)

    return pd.DataFrame([{"prompt": name, "text": r.text if r else "(no start text)",
                          "agreement with the prefix": round(r.agreement, 3) if r else None,
                          "macro-F1": round(r.macro_f1, 3) if r else None,
                          "label bias": bias(r),
                          "agreement, no bias": round(r.plain_agreement, 3) if r else None,
                          "macro-F1, no bias": round(r.plain_macro_f1, 3) if r else None}
                         for name, r in rows])


class ReadableRoom:
    """Set up by Workbench.__init__: `_explaining` (through `_kept`); `open` comes from the runs
    room, `inspection` from the inspection room, `_kept` from the explaining room."""

    open: Callable[[str], Run]
    inspection: Callable[..., object]
    _kept: Callable[..., object]

    def readable_prompt(self, run_id: str, length: int = DEFAULT_LENGTH,
                        steps: int = SearchConfig.steps, seconds: float | None = SEARCH_SECONDS,
                        progress: Callable[[str], None] | None = None) -> ReadablePrompt:
        """The run's readable prompt of `length` tokens after at most `steps` search steps
        and `seconds` of search (None: no budget), kept per prefix file and settings; also
        written to the run folder."""
        run = self.open(run_id)

        def make() -> ReadablePrompt:
            nearest = self.inspection(run_id).nearest
            found = readable_prompt(run, nearest, length,
                                    SearchConfig(steps=steps, seconds=seconds or None),
                                    progress=progress)
            write_readable(found, run.folder.path)
            return found

        return self._kept("readable", run_id, make, length, steps, seconds)


__all__ = ["ReadableRoom", "readings_frame"]
