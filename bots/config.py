"""Loading bots YAML: ``${ENV}`` interpolation, then validation with errors that name the line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bots.schemas import BotsFile
from core.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str], source: str) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}``; an unset variable without default is an error."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("#"):
            out.append(line)
            continue

        def repl(match: re.Match[str], number: int = number) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name) or default
            if value is None:
                raise ConfigError(f"{source}:{number}: environment variable {name} is not set")
            return value

        out.append(_VAR.sub(repl, line))
    return "".join(out)


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at pydantic's error location (closest known parent)."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def parse_bots(text: str, *, environ: Mapping[str, str], source: str = "bots.yaml") -> BotsFile:
    """Validate a bots file. Raises :class:`ConfigError` naming the file and line."""
    expanded = interpolate(text, environ, source)
    try:
        root = yaml.compose(expanded, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(expanded)
    except yaml.YAMLError as exc:
        # An unclosed bracket is noticed a line later; the context mark is where it opened.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: expected a mapping with 'workspace', 'meta_apps', 'bots'")
    try:
        spec = BotsFile.model_validate(data)
    except ValidationError as exc:
        problems = [(tuple(error["loc"]), str(error["msg"])) for error in exc.errors()]
    else:
        problems = spec.reference_errors()
        if not problems:
            return spec
    messages = []
    for loc, message in problems:
        path = ".".join(str(p) for p in loc) or "(top level)"
        messages.append(f"{source}:{line_of(root, loc) or 1}: {path}: {message}")
    raise ConfigError("\n".join(messages))


def load_bots(path: Path, environ: Mapping[str, str]) -> BotsFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_bots(text, environ=environ, source=str(path))
