"""The one Jinja environment, and where the shipped data folders are found.

In a source checkout (editable install) the folders templates/, configs/, images/ and charts/
sit beside the package; in a wheel they are installed as launcher/_data/<folder>.
"""

from __future__ import annotations

import json
import shlex
from functools import cache
from pathlib import Path

import jinja2
import yaml

from launcher.errors import RenderError

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """A shipped data folder: templates, configs, images or charts."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise RenderError(f"the launcher's '{name}' folder is missing from this installation; reinstall the package")


class _BlockDumper(yaml.SafeDumper):
    """Writes plain YAML: no anchors, block style, multi-line strings as literals."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_presenter)


def to_yaml(data) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)


def to_json(data) -> str:
    return json.dumps(data, indent=2) + "\n"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        # templates/ holds the job's artifacts, images/ the Dockerfile templates of the image matrix.
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(data_dir(name))) for name in ("templates", "images")]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        # bash uses "{#" (as in ${#array[@]}), so Jinja comments are spelled {## ... ##}.
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["to_yaml"] = to_yaml
    return env


def render_template(name: str, **context) -> str:
    try:
        return environment().get_template(name).render(**context)
    except jinja2.TemplateError as exc:
        raise RenderError(f"template {name}: {exc}") from None
