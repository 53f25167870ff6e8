"""What every tab shares: the page's one notice line for errors, turning core errors into
one readable message, giving a module-level handler its workbench, escaping, and the
progress and Stop button of a long action.

A handler wired with `wire` never raises into Gradio: a user error becomes one line in the
notice at the top of the page (Gradio would otherwise mark every output of the event with an
"Error" badge and print a traceback), and the next handler that succeeds clears it. API
endpoints (`gr.api`) keep `guard`, which raises gr.Error: a script wants an exception.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from prefixlab.errors import USER_ERRORS, PrefixLabError

log = logging.getLogger("prefixlab.ui")


def user_message(e: Exception) -> str:
    """The one line a person reads for a failed action (unexpected errors are logged)."""
    if isinstance(e, gr.Error):
        return str(e.message)
    if isinstance(e, USER_ERRORS):
        return str(e)
    return (f"Something went wrong ({type(e).__name__}: {e}). The details are in the app's "
            "log.")


def notice_html(message: str) -> str:
    return (f"<div class='notice-error' role='alert'>{escape(message)}</div>"
            if message else "")


def wire(trigger: Callable, fn: Callable, inputs: list, outputs: list, notice: gr.HTML,
         *, clears: bool = True, **kwargs):
    """Connect `fn` to an event so its failures land in `notice` and nowhere else.

    On success the outputs get fn's values and the notice is cleared (`clears=False` leaves it,
    for background polls); on a user error the outputs stay as they were and the notice says
    what went wrong. A user error prints one line to the terminal; an unexpected one its
    traceback. These handlers are the page's own, not the scripting API.
    """
    n = len(outputs)

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            result = fn(*args)
        except (gr.Error, *USER_ERRORS) as e:
            log.warning("%s: %s", fn.__name__, user_message(e))
            return [gr.skip()] * n + [notice_html(user_message(e))]
        except Exception as e:  # unexpected: the traceback goes to the log, one line to the page
            log.exception("handler %s failed", fn.__name__)
            return [gr.skip()] * n + [notice_html(user_message(e))]
        values = [] if n == 0 else list(result) if n > 1 else [result]
        return values + ["" if clears else gr.skip()]

    kwargs.setdefault("api_visibility", "private")
    return trigger(wrapper, inputs=inputs, outputs=[*outputs, notice], **kwargs)


def guard(fn: Callable) -> Callable:
    """The one place core exceptions become gr.Error: a message, never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from e
        except Exception as e:  # unexpected: logged with its traceback, shown as one line
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(user_message(e), print_exception=False) from e

    return wrapper


def bind(fn: Callable, *first) -> Callable:
    """`fn` with its first arguments given (a tab's handler with the app's workbench), for
    `build()` to wire. It keeps fn's name, docstring and the signature of the arguments left:
    Gradio names the event after the function, reads the signature to inject gr.Progress, and
    gr.api reads types and docs from it."""
    bound = functools.partial(fn, *first)
    signature = inspect.signature(bound)
    functools.update_wrapper(bound, fn)
    bound.__signature__ = signature
    return bound


@dataclass(frozen=True)
class LoadHook:
    """A handler a tab wants run when a page opens (e.g. fill a list, follow a live run)."""

    fn: Callable
    inputs: list
    outputs: list


def shown(value) -> dict:
    """A plot or table update that hides the component while it has nothing to show (an
    empty gr.Plot says "Plot", an empty gr.Dataframe has headers "1 2 3")."""
    empty = value is None or (hasattr(value, "empty") and value.empty)
    return gr.update(value=value, visible=not empty)


def escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {escape(i)}" for i in items)


def run_choices(rows) -> list[tuple[str, str]]:
    return [(f"{r.name} · {r.state} · {r.id[:15]}", r.id) for r in rows]


# --- long actions: progress and Stop --------------------------------------------------------


class Stopped(PrefixLabError):
    """A long action stopped between two chunks of rows because its person pressed Stop."""


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


@dataclass
class LongAction:
    """One page's long action of one kind (an evaluation on a test file, a batch prediction):
    how far it got and whether its person asked it to stop.

    One per session and kind (gr.State gives each session its own copy), shared by the
    action's handler, which follows it through `progress_of` while it runs, and its Stop
    button's handler, which only sets `stop`; the action checks it after each chunk of rows.
    """

    running: bool = False
    stop: bool = False
    what: str = ""
    done: int = 0
    total: int = 0
    started: float = 0.0  # time.monotonic() when the action began
    part_started: float = 0.0  # ... and when its current part (`what`) began

    def begin(self) -> None:
        self.running, self.stop, self.what, self.done, self.total = True, False, "", 0, 0
        self.started = self.part_started = time.monotonic()

    def end(self) -> None:
        self.running = False

    def ask_stop(self) -> bool:
        """Ask the running action to stop; False when none runs."""
        if self.running:
            self.stop = True
        return self.running

    def line(self) -> str:
        """e.g. "scoring held-out rows with the prefix: 64/240 · 12 s so far · about 33 s left"."""
        now = time.monotonic()
        text = f"{self.what}: {self.done:,}/{self.total:,} · {duration(now - self.started)} so far"
        if 0 < self.done < self.total:
            left = (now - self.part_started) / self.done * (self.total - self.done)
            text += f" · about {duration(left)} left" + (" for this part" if self.started
                                                           < self.part_started else "")
        return text

    def stopped_line(self) -> str:
        return (f"Stopped after {self.done:,} of {self.total:,} ({self.what}), "
                f"{duration(time.monotonic() - self.started)} in.")


def progress_of(action: LongAction, show: Callable | None = None
                ) -> Callable[[str, int, int], None]:
    """The progress callback to give the workbench: it records each report in `action`, shows
    its line (`show(fraction, desc=line)`: a gr.Progress), and raises Stopped once the person
    asked to stop."""

    def told(what: str, done: int, total: int) -> None:
        if what != action.what:  # a new part (the first began with the action)
            if action.what:
                action.part_started = time.monotonic()
            action.what = what
        action.done, action.total = done, total
        if show is not None:
            show(done / total if total else None, desc=action.line())
        if action.stop:
            raise Stopped(action.stopped_line())

    return told


def stop_action(action: LongAction) -> None:
    """Stop pressed: the running action stops after its current chunk of rows."""
    if not action.ask_stop():
        raise gr.Error("Nothing is running.")
