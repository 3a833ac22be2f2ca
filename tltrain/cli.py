"""`tltrain` command line: thin wrappers; the work happens in driver / tune / bench / registry."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tltrain.config import JobSpec, SpecError, load_spec


def _emit_json(obj: dict[str, Any]) -> None:
    # The last stdout line is one JSON object, for scripts and CI.
    print(json.dumps(obj, default=str), flush=True)


# The spec commands return their summary; main() prints it as JSON with --json.
def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.driver import run_train

    return run_train(load_spec(args.spec, args.set))


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.tune import run_tune

    return run_tune(load_spec(args.spec, args.set), resume=args.resume)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.demo import run_demo

    return run_demo(args.set, quick=args.quick)


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.bench import run_bench

    return run_bench(load_spec(args.spec, args.set), steps=args.steps)


def cmd_validate(args: argparse.Namespace) -> int:
    from tltrain.preflight import build_plan

    spec = load_spec(args.spec, args.set)
    plan = build_plan(spec)
    print(f"ok: {spec.name}: {len(plan.class_names)} classes, {len(plan.train)} train / {len(plan.val)} val images, "
          f"{plan.num_layer_groups} layer groups: {', '.join(plan.layer_group_names)}")
    return 0


def cmd_spec_fields(args: argparse.Namespace) -> int:
    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
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


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tltrain", description="Fine-tune pretrained image models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a job spec")
    _spec_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search fine-tuning hyperparameters (the spec's tune: section)")
    _spec_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="transfer vs from-scratch on packaged data and weights (embedded defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override the demo spec")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="img/s: bare PyTorch step vs Ray Train step vs end to end")
    _spec_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("validate", help="check a spec against its data and model, start nothing")
    _spec_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("spec-fields", help="list every spec field with its default and meaning")
    p.set_defaults(func=cmd_spec_fields)

    from tltrain import cli_jobs, cli_registry, prepare, submit

    submit.add_commands(sub)
    cli_jobs.add_commands(sub)
    cli_registry.add_commands(sub)
    prepare.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The hub is unreachable offline and timm/HF retry for ~50 s: fail fast unless the user opts in.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = args.func(args)
        if isinstance(result, dict):
            if args.json:
                _emit_json(result)
            return 0
        return int(result or 0)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
