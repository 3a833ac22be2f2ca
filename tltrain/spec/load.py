"""YAML -> JobSpec: `--set` overrides through the one dotted setter, validation errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tltrain.spec.schema import JobSpec, SpecError


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for e in err.errors():
        # pydantic adds union-branch names (".int", ".literal['all']") to the path; users never wrote them.
        parts = [str(p) for p in e["loc"] if not re.fullmatch(r"int|str|float|bool|literal\[.*\]|function-.*", str(p))]
        field = ".".join(parts) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against `tltrain spec-fields`"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a spec tree, creating missing sections; a value in the way is an error (the
    one setter behind `--set` and a trial's sampled values)."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML (so 3e-4, true, null, [1,2] work)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def parse_spec(tree: dict[str, Any], source: str = "") -> JobSpec:
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply `--set` overrides, validate. Raises SpecError naming the field."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"job spec {path}: file not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"job spec {path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise SpecError(f"job spec {path}: the top level must be a mapping of sections")
    apply_overrides(tree, overrides or [])
    return parse_spec(tree, str(path))
