"""`tltrain train`, `validate` and `spec-fields`: one job spec, trained or checked."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tltrain.commands._args import add_force_unlock_arg, add_spec_args
from tltrain.spec import JobSpec, load_spec


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.execution.train import run_train

    return run_train(load_spec(args.spec, args.set), force_unlock=args.force_unlock)


def cmd_validate(args: argparse.Namespace) -> int:
    from tltrain.execution.preflight import build_plan
    from tltrain.reports.progress import describe_groups

    spec = load_spec(args.spec, args.set)
    plan = build_plan(spec)
    print(
        f"ok: {spec.name}: {len(plan.class_names)} classes, {len(plan.train)} train / {len(plan.val)} val images, "
        f"{plan.num_layer_groups} layer groups: {', '.join(plan.layer_group_names)}"
    )
    describe_groups(spec, plan, sys.stdout)
    return 0


def cmd_spec_fields(args: argparse.Namespace) -> int:
    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            annotation = field.annotation
            sub = annotation if isinstance(annotation, type) and hasattr(annotation, "model_fields") else None
            if sub is None and hasattr(annotation, "__args__"):
                sub = next((a for a in annotation.__args__ if isinstance(a, type) and hasattr(a, "model_fields")), None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
            else:
                default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
                print(f"{prefix}{name} = {default}  # {field.description or ''}")

    walk(JobSpec, "")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune from a job spec")
    add_spec_args(p)
    add_force_unlock_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a spec against its data and model, start nothing")
    add_spec_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("spec-fields", help="list every spec field with its default and meaning")
    p.set_defaults(func=cmd_spec_fields)
