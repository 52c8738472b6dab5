"""What the job file and the image matrix share: closed pydantic models, and one line per validation error.

A model's first error becomes "field.path: message"; a problem a check finds across several fields is
raised as FieldProblem, which names its own path.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Closed(BaseModel):
    # An unknown key is a typo to report; a loaded section is not changed afterwards.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Strict(Closed):
    # strict: YAML already gives numbers and booleans their types, so `alpha: true` or `epochs: "3"`
    # is a mistake to report, not a value to convert.
    model_config = ConfigDict(strict=True)


class FieldProblem(ValueError):
    """A problem that belongs to one field path, found by a check that spans several fields."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6,
                 form: str = "; did you mean '{}'?") -> str:
    """form filled in with the choice closest to word, or "" when none is as close as cutoff (difflib's ratio)."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return form.format(close[0]) if close else ""


def format_loc(loc: tuple) -> str:
    """('cluster', 'nodes', 1, 'devices') -> 'cluster.nodes[1].devices'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The pydantic model under root that owns the location (for 'did you mean' on unknown keys)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return model
        model = nxt
    return model


def first_error(err: ValidationError, name: str, root: type[BaseModel] | None = None) -> str:
    """The first error of err as "field.path: message"; name stands for the path of the whole input.

    Given root, the model validated, the line helps further: list indexes read [i], an unknown key or
    literal gets a 'did you mean' (or the allowed keys), and a value of the wrong type is quoted.
    Without, it is pydantic's path, dotted, and its message.
    """
    e = err.errors(include_url=False)[0]
    problem = e.get("ctx", {}).get("error")
    if isinstance(problem, FieldProblem):
        return f"{problem.path}: {problem}"
    loc, kind, given = e["loc"], e["type"], e.get("input")
    path = (format_loc(loc) if root else ".".join(str(p) for p in loc)) or name
    if kind == "extra_forbidden":
        if root is None:
            return f"{path}: unknown key"
        owner, key = model_at(root, loc[:-1]), str(loc[-1])
        hint = did_you_mean(key, owner.model_fields) or f"; allowed keys: {', '.join(owner.model_fields)}"
        return f"{path}: unknown key '{key}'{hint}"
    msg = "is required" if kind == "missing" else e["msg"].removeprefix("Value error, ")
    if root is not None:
        if kind == "literal_error" and isinstance(given, str):
            msg += did_you_mean(given, re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", "")))
        if kind.endswith(("_type", "_parsing")) and not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
    return f"{path}: {msg}"
