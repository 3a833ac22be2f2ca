"""The job spec: what users write, typed and checked before anything heavy loads.

Owns the pydantic JobSpec (`schema`), YAML loading with `--set` overrides (`load`), search
distributions (`space`) and the search space checked against the spec (`search`), the bounds that
need a count from the data or model (`bounds`), and metric names with the one "better" rule
(`metrics`). Imports pydantic and yaml only.
"""

from tltrain.spec.load import apply_overrides, load_spec, parse_spec, set_dotted
from tltrain.spec.schema import DEFAULT_STORE_DIR, JobSpec, SpecError, expand_path

__all__ = [
    "DEFAULT_STORE_DIR",
    "JobSpec",
    "SpecError",
    "apply_overrides",
    "expand_path",
    "load_spec",
    "parse_spec",
    "set_dotted",
]
