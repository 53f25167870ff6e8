"""Command-line options generated from the settings dataclasses, so they have one source.

Each field of RunConfig, PrefixConfig and TrainConfig becomes `--field-name`, typed from its
annotation, with the field's docstring as help. Options default to "not given" (argparse's
SUPPRESS): the namespace holds only what the user typed and the dataclass supplies every other
value, so a default is written once, in the dataclass, and the CLI cannot drift from it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class statement's
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _argument(cls: type, f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords for one field: its type (or choices, or a switch) and its help."""
    help_text = field_docs(cls).get(f.name, "").replace("%", "%%")
    if not any(f.default is x for x in (dataclasses.MISSING, None, False, ())):  # off: unsaid
        help_text = f"{help_text} (default: {f.default})".strip()
    kwargs: dict[str, Any] = {"help": help_text or None, "default": argparse.SUPPRESS}
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint  # X | None: given means X
    if hint is bool:
        # a switch: --name turns on an off-by-default setting, --no-name turns off the rest
        on = f.default is False
        return {**kwargs, "action": "store_true" if on else argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return {**kwargs, "choices": choices, "type": type(choices[0])}
    if hint in (int, float, str):
        return {**kwargs, "type": hint}
    if hint == tuple[float, ...]:  # typed as a comma list; the dataclass reads the text
        return {**kwargs, "type": str, "metavar": "X[,X...]"}
    raise TypeError(
        f"{cls.__name__}.{f.name}: the CLI cannot read a {hint!r} from the command line; give "
        f"the field a plain type (bool, int, float, str, a Literal, or one of them | None), "
        f"or list it in the `skip` of its add_options call in cli/main.py"
    )


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                only: Iterable[str] | None = None) -> list[str]:
    """Add `--field-name` for every field of the dataclass `cls` (or those in `only`) but `skip`.

    Returns the field names added, for `given`.
    """
    hints = typing.get_type_hints(cls)
    only = None if only is None else set(only)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, **_argument(cls, f, hints[f.name]))
        names.append(f.name)
    return names


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among `names` that the user gave, as dataclass keywords."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def stop_strings(args) -> list[str] | None:
    """--stop values, with the escapes a shell makes hard to type ("\\n", "\\t") read."""
    stops = [x.replace("\\n", "\n").replace("\\t", "\t") for x in getattr(args, "stop", [])]
    return stops or None


def dotted_settings(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`--set KEY=VALUE` items as the parts of a RunConfig: {"run": ..., "prefix": ...,
    "training": ..., "generation": ...}. KEY is a run setting (`decision`) or a section's
    (`training.learning_rate`, `prefix.prefix_length`); VALUE is read as JSON where it parses
    (numbers, true/false, null) and as text otherwise. Names are checked where the config is
    built, which names the unknown ones."""
    import json

    from prefixlab.errors import ConfigError

    parts: dict[str, dict[str, Any]] = {"run": {}, "prefix": {}, "training": {},
                                         "generation": {}}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not sep or not name or (dot and section not in parts) or section == "run":
            raise ConfigError(f"--set wants KEY=VALUE with KEY a setting or SECTION.SETTING "
                              f"(sections: prefix, training, generation), got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parts[section or "run"][name] = value
    return parts
