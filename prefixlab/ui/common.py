"""What every tab shares: turning core errors into one readable gr.Error, and escaping."""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from prefixlab.errors import USER_ERRORS

log = logging.getLogger("prefixlab.ui")


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
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The details are "
                           "in the app's log.", print_exception=False) from e

    return wrapper


@dataclass(frozen=True)
class LoadHook:
    """A handler a tab wants run when a page opens (e.g. fill a list, follow a live run)."""

    fn: Callable
    inputs: list
    outputs: list


def escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {escape(i)}" for i in items)


def run_choices(rows) -> list[tuple[str, str]]:
    return [(f"{r.name} · {r.state} · {r.id[:15]}", r.id) for r in rows]
