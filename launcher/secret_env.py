"""The job's secret_env: where each secret value comes from, and reading the values when a run starts.

The plan carries only where the values come from (SOURCES_PATH: variable names, file paths, Secret
references), so that a rendered plan can be run later; `render` never reads a value. Each backend
reads the values in its host check (before the run directory exists) and again when it starts the
ranks, and hands them over without writing them anywhere:
- local: the node script's environment;
- SSH: the standard input of start.sh on each node, which exports them for the detached node script;
- Kubernetes: a Secret the backend creates for the run, which the pods read through secretKeyRef.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from launcher.errors import ConfigError
from launcher.job_sections import SecretSource

SOURCES_PATH = "env/secret_env.json"


def secret_name(job_name: str) -> str:
    """The Secret the k8s backend creates for the values it reads; the plan names it after the job,
    and each run's copy gets the run's name as the job's other objects do (backends/k8s/objects.py)."""
    return f"{job_name}-secret-env"


def sources_artifact(sources: Mapping[str, SecretSource]) -> dict[str, str]:
    """The plan file that says where each value comes from (never a value); none without secret_env."""
    if not sources:
        return {}
    data = {name: source.model_dump(exclude_none=True) for name, source in sources.items()}
    return {SOURCES_PATH: json.dumps(data, indent=2) + "\n"}


def plan_sources(artifacts: Mapping[str, str]) -> dict[str, SecretSource]:
    """Where the values of a plan's secret_env come from, read back from its artifact."""
    text = artifacts.get(SOURCES_PATH)
    if text is None:
        return {}
    return {name: SecretSource.model_validate(source) for name, source in json.loads(text).items()}


def read_here(sources: Mapping[str, SecretSource]) -> dict[str, SecretSource]:
    """The sources whose values the launcher reads (not references to an existing Kubernetes Secret)."""
    return {name: s for name, s in sources.items() if s.secret is None}


def resolve(sources: Mapping[str, SecretSource]) -> dict[str, str]:
    """NAME -> value for every source the launcher reads. Raises one ConfigError naming the first
    that cannot be read; the message never holds a value."""
    values = {}
    for name, source in read_here(sources).items():
        where = f"secret_env.{name}"
        if source.from_env is not None:
            value = os.environ.get(source.from_env)
            if value is None:
                raise ConfigError(f"{where}: the variable {source.from_env} is not set in the launcher's "
                                  "environment; export it before 'launcher up'")
        else:
            value = _read_file(where, Path(os.path.expanduser(source.from_file)))
        if "\0" in value:
            raise ConfigError(f"{where}: the value holds a NUL byte, which no environment variable can carry")
        values[name] = value
    return values


def _read_file(where: str, path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: cannot read {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    return text.removesuffix("\n")  # what `echo value >file` adds


def stdin_payload(values: Mapping[str, str]) -> str:
    """The values as start.sh reads them from its standard input: NAME=value, each ended by a NUL byte
    (a value may hold line breaks, never a NUL)."""
    return "".join(f"{name}={value}\0" for name, value in values.items())
