"""`--set key=value`: one change to the job file's YAML mapping, made before the job is validated.

The key is a path into the job: `parallel.data_parallel`, `cluster.nodes[1].host`. It is checked against
the Job model as it is read, so a typo is reported with the --set that holds it. A mapping of free keys
(env, mindformers.overrides, node_selector) takes all that is left of the path as one key:
`mindformers.overrides.runner_config.epochs` is the override 'runner_config.epochs'. The value is YAML,
as it would be in the file: 4 is an int, '"4"' a string, [0,1] a list.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import ConfigError
from launcher.schema import FieldProblem, did_you_mean, format_loc

_KEY_RE = re.compile(r"[^.\[\]]+")
_INDEX_RE = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Override:
    text: str  # as given on the command line
    path: tuple[str | int, ...]  # keys and list indexes
    value: Any

    @property
    def where(self) -> str:
        return format_loc(self.path)


def parse_override(text: str, root: type[BaseModel]) -> Override:
    """'a.b[1].c=value' as an Override, its path checked against root (the Job model)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"--set {text}: give KEY=VALUE, e.g. --set parallel.data_parallel=4")
    if not key:
        raise ConfigError(f"--set {text}: the key before '=' is empty; give a path such as parallel.data_parallel")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"--set {text}: the value does not parse as YAML: {problem}") from None
    return Override(text, _parse_path(text, key, root), value)


def apply_overrides(data: dict, overrides: Sequence[Override]) -> dict:
    """A copy of the job file's mapping with each override made, in order (a later one wins)."""
    data = _plain_copy(data)
    for override in overrides:
        _apply(data, override)
    return data


def blame(err: ValidationError, overrides: Sequence[Override]) -> Override | None:
    """The last override whose path holds the field the first error names, or lies inside it."""
    e = err.errors(include_url=False)[0]
    problem = e.get("ctx", {}).get("error")
    failed = problem.path if isinstance(problem, FieldProblem) else format_loc(e["loc"])
    if not failed:
        return None
    for override in reversed(overrides):
        if _within(failed, override.where) or _within(override.where, failed):
            return override
    return None


def _within(path: str, outer: str) -> bool:
    return path == outer or path.startswith((outer + ".", outer + "["))


def _shape(kind: Any) -> tuple[str, Any]:
    """What a field's annotation holds, for walking a path: model, list, map (of models), free (a mapping
    whose keys are the user's), or value; and the model, item or value type inside."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        return _shape(kinds[0]) if len(kinds) == 1 else ("value", None)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "model", kind
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        return "list", args[0] if args else Any
    if typing.get_origin(kind) is dict:
        inner = args[1] if args else Any
        return ("map" if _shape(inner)[0] == "model" else "free"), inner
    return "value", None


def _parse_path(text: str, key: str, root: type[BaseModel]) -> tuple[str | int, ...]:
    """The keys and indexes of key, read along root's fields; an unknown key or a step into a value is
    an error naming the --set."""
    def bad(message: str) -> ConfigError:
        return ConfigError(f"--set {text}: {message}")

    parts: list[str | int] = []
    kind: Any = root
    rest = key
    while rest:
        shape, inner = _shape(kind)
        here = format_loc(tuple(parts))
        if rest.startswith("["):
            index = _INDEX_RE.match(rest)
            if index is None:
                raise bad(f"'{rest}' is not an index; write a list item as [0], [1], ...")
            if shape != "list":
                raise bad(f"{here} is not a list, so it has no item [{index[1]}]")
            parts.append(int(index[1]))
            kind, rest = inner, rest[index.end():]
            continue
        if parts:
            if not rest.startswith("."):
                raise bad(f"'{rest}' after {here}: separate keys with '.'")
            rest = rest[1:]
        if shape == "free":  # the user's own keys: the rest of the path is one of them
            name = rest
        elif (match := _KEY_RE.match(rest)) is not None:
            name = match[0]
        else:
            name = ""
        if not name:
            raise bad(f"an empty key in '{key}'")
        if shape == "model":
            if name not in inner.model_fields:
                hint = did_you_mean(name, inner.model_fields) or f"; allowed keys: {', '.join(inner.model_fields)}"
                raise bad(f"unknown key '{name}'{f' in {here}' if here else ''}{hint}")
            kind = inner.model_fields[name].annotation
        elif shape in ("map", "free"):
            kind = inner
        elif shape == "list":
            raise bad(f"{here} is a list; pick an item, as in {here}[0].{name}")
        else:
            raise bad(f"{here} holds a value, not keys; set it as --set {here}=VALUE")
        parts.append(name)
        rest = rest[len(name):]
    return tuple(parts)


def _apply(data: dict, override: Override) -> None:
    """Set the value at the override's path. A mapping on the way that the file leaves out (or leaves
    empty) is created, as for `lora.rank=16` in a file without lora:; a list is never extended."""
    def bad(message: str) -> ConfigError:
        return ConfigError(f"--set {override.text}: {message}")

    path = override.path
    node: Any = data
    for depth, part in enumerate(path):
        here = format_loc(path[:depth])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise bad(f"{here} is {node!r} in the job file, not a list; set it whole with --set {here}=[...]")
            if part >= len(node):
                items = f"{len(node)} item" + ("" if len(node) == 1 else "s")
                raise bad(f"index {part} is past the end of {here}, which has {items}")
        elif not isinstance(node, dict):
            raise bad(f"{here} is {node!r} in the job file, not a mapping")
        if depth == len(path) - 1:
            node[part] = override.value
            return
        child = node[part] if isinstance(part, int) else node.get(part)
        if child is None:
            if isinstance(path[depth + 1], int):
                raise bad(f"{format_loc(path[:depth + 1])} is not in the job file; give the whole list with "
                          f"--set {format_loc(path[:depth + 1])}=[...]")
            child = node[part] = {}
        node = child


def _plain_copy(value: Any) -> Any:
    # Not copy.deepcopy: YAML anchors share objects, and a --set changes the one place it names.
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    return value
