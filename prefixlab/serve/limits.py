"""What one request may ask of a server, in one place: the app (`python app.py`) and the API
server (`python -m prefixlab serve`) refuse a request over a bound before any work starts,
with a message that names the bound and what to change.

Every bound is the operator's to set, through an environment variable read at start
(`Limits.from_env`); README.md lists them. The defaults let one request use a 2-core laptop
for a minute or two at most and keep a generation batch's memory near 2 GB.

The checks of what a client sends live here too (`texts`, `whole`, `number`, `flag`): a
script that passes a string where a list goes, a NaN temperature or a lone surrogate gets one
line naming the parameter and the type it needs, never a traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from prefixlab.errors import ConfigError, PrefixLabError


class RequestError(PrefixLabError, ValueError):
    """A request refused before any work: over a bound, or a value of the wrong type."""


@dataclass(frozen=True)
class Limits:
    """The most one request may ask. Each field's environment variable is
    `PREFIXLAB_MAX_<FIELD>` (e.g. PREFIXLAB_MAX_TEXTS=1000)."""

    texts: int = 2000  # texts (or prompts) per request; larger ones are served in chunks
    rows_generated: int = 64  # prompts × beams × runs per generation request
    chars: int = 20_000  # characters per text, as the Data tab reads a cell
    new_tokens: int = 1024  # max_new_tokens
    body_mb: float = 16.0  # a request body (JSON); a file upload has its own 50 MB cap
    csv_rows: int = 100_000  # rows of a file per /predict_csv (a job: progress and cancel)
    decode_mb: float = 2048.0  # memory one generation batch may take for its cache

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{env_name(f.name)} must be a number above 0, got {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The defaults, with each bound an operator set in the environment."""
        env = os.environ if env is None else env
        given = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or not raw.strip():
                continue
            kind = float if f.type in ("float", float) else int
            try:
                given[f.name] = kind(raw)
            except ValueError:
                what = "a number" if kind is float else "a whole number"
                raise ConfigError(f"{env_name(f.name)} must be {what}, got {raw!r}") from None
        return cls(**given)

    @property
    def body_bytes(self) -> int:
        return int(self.body_mb * 2**20)

    @property
    def decode_bytes(self) -> int:
        return int(self.decode_mb * 2**20)


def env_name(field_name: str) -> str:
    return f"PREFIXLAB_MAX_{field_name.upper()}"


# --- what a client sends -----------------------------------------------------------------------


def texts(values: object, name: str, limits: Limits) -> list[str]:
    """A list of non-empty texts, each encodable and within the bounds; blank entries dropped.

    RequestError naming `name` for a string instead of a list, an entry that is not a string,
    a lone surrogate, or a bound crossed."""
    if isinstance(values, str):
        raise RequestError(f"{name} must be a list of strings, got one string: send "
                           f"[{_short(values)!r}]")
    if not isinstance(values, list | tuple):
        raise RequestError(f"{name} must be a list of strings, got {kind_of(values)}")
    out = []
    for i, value in enumerate(values):
        text(value, f"{name}[{i}]", limits)
        if value.strip():
            out.append(value.strip())
    if not out:
        raise RequestError(f"give at least one non-empty string in {name}")
    if len(out) > limits.texts:
        raise RequestError(f"{name} has {len(out):,} entries; this server takes at most "
                           f"{limits.texts:,} per request ({env_name('texts')}): send them "
                           "in several requests")
    return out


def text(value: object, name: str, limits: Limits) -> str:
    """`value` if it is a string within the character bound that UTF-8 can encode."""
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {kind_of(value)}")
    if len(value) > limits.chars:
        raise RequestError(f"{name} has {len(value):,} characters; this server reads at most "
                           f"{limits.chars:,} per text ({env_name('chars')})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{name} is not valid text: character {e.start} is a lone "
                           "surrogate (half of a UTF-16 pair); send the whole character"
                           ) from None
    return value


def names(values: object, name: str) -> list[str]:
    """A list of strings (run ids); an empty list or None is an empty list."""
    if values is None:
        return []
    if isinstance(values, str):
        raise RequestError(f"{name} must be a list of strings, got one string: send "
                           f"[{_short(values)!r}]")
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise RequestError(f"{name} must be a list of strings, got {kind_of(values)}")
    return [v for v in values if v.strip()]


def whole(value: object, name: str, low: int, high: int, bound: str | None = None) -> int:
    """An integer in [low, high]; a float with no fraction is taken, a bool is not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number, got {kind_of(value)}")
    if not low <= value <= high:
        where = f" on this server ({env_name(bound)})" if bound else ""
        raise RequestError(f"{name} must be {low}..{high}{where}, got {value}")
    return value


def number(value: object, name: str) -> float:
    """A finite number (an integer is taken; NaN, infinity and bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {kind_of(value)}")
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    return float(value)


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {kind_of(value)}")
    return value


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."
