"""`tltrain register`, `tltrain registry list|show|promote|pull` and `tltrain predict`.

Thin: parse arguments, call tracking.registry (`predict`: execution.predict), print. cli.py wires these in with
`add_commands(subparsers)`; `python -m tltrain.commands.registry ...` runs them standalone.
Every command takes --tracking-uri (default: MLFLOW_TRACKING_URI, else ~/.tltrain/mlflow.db) and
--json (one JSON object as the last line of stdout, for scripts).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tltrain.commands._args import add_tracking_uri_arg

_EXAMPLES = "refs: NAME (latest version) | NAME@ALIAS | NAME/VERSION"


def _common(p: argparse.ArgumentParser) -> None:
    add_tracking_uri_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, default=str) if args.json else text)


def cmd_register(args: argparse.Namespace) -> int:
    from tltrain.tracking import registry

    info = registry.register_checkpoint(
        args.checkpoint,
        args.name,
        tracking_uri=args.tracking_uri,
        run_id=args.run_id,
        alias=args.alias or None,
        experiment=args.experiment,
    )
    state = "registered" if info.created else "already registered as"
    _emit(args, {"name": info.name, "version": info.version, "created": info.created},
          f"{state} {info.name} version {info.version}" + (f" (alias {args.alias})" if args.alias else ""))  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tltrain.tracking import registry

    models = registry.list_models(tracking_uri=args.tracking_uri)
    lines = [f"{'NAME':30} {'LATEST':>6} {'VERSIONS':>8}  ALIASES"]
    for m in models:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(m["aliases"].items())) or "-"
        lines.append(f"{m['name']:30} {m['latest_version'] or '-':>6} {m['num_versions']:>8}  {aliases}")
    _emit(args, {"models": models}, "\n".join(lines) if models else "no registered models")
    return 0


def _target_row(target: dict[str, Any] | None) -> str | None:
    """The unlabelled target images a domain-adapted version was aligned to."""
    return f"{target.get('num_files')} files, sha256 {target['sha256']}" if target else None


def _settings_row(settings: Any) -> str | None:
    """A strategy section's settings as k=v (a clipped tag arrives as its raw string)."""
    if isinstance(settings, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return settings


def _format_show(d: dict[str, Any]) -> str:
    ds = d["dataset"]
    classes = ds["class_names"]
    rows = [
        ("model", f"{d['name']} version {d['version']}" + (f"  [{', '.join(d['aliases'])}]" if d["aliases"] else "")),
        ("uri", d["model_uri"]),
        ("created", d["created"]),
        ("architecture", d["model_name"]),
        ("checkpoint", d["checkpoint_uri"]),
        ("checkpoint sha256", d["checkpoint_sha256"]),
        ("source weights", d["source_weights_uri"] or "none (trained from scratch)"),
        ("source sha256", d["source_weights_sha256"]),
        ("dataset sha256", ds["sha256"]),
        ("dataset files", ds["num_files"]),
        ("classes", f"{len(classes)}: {', '.join(classes)}" if isinstance(classes, list) else classes),
        ("target images", _target_row(d.get("target_unlabelled"))),
        ("domain adaptation", _settings_row(d.get("domain_adaptation"))),
        ("lora", _settings_row(d.get("lora"))),
        ("trial", d["trial"]),
        ("ray run", d["ray_run"]),
        ("mlflow run", d["run_id"]),
        ("epoch", d["epoch"]),
        (
            "metrics",
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (d["metrics"] or {}).items()),
        ),
        ("tltrain", d["tltrain_version"]),
        ("git commit", d["git_commit"]),
    ]
    out = [f"{k + ':':19} {v}" for k, v in rows if v not in (None, "")]
    if d["spec"]:
        import yaml

        out.append("spec:")
        out.append("  " + yaml.safe_dump(d["spec"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return "\n".join(out)


def cmd_show(args: argparse.Namespace) -> int:
    from tltrain.tracking import registry

    d = registry.show(args.ref, tracking_uri=args.tracking_uri)
    _emit(args, d, _format_show(d))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tltrain.tracking import registry

    name, version = args.name, args.version
    if version is None:  # NAME/VERSION or NAME@ALIAS in one argument
        from mlflow import MlflowClient

        mv = registry.resolve_version(MlflowClient(registry.resolve_tracking_uri(args.tracking_uri)), name)
        name, version = mv.name, str(mv.version)
    before = registry.promote(name, version, args.alias, tracking_uri=args.tracking_uri)
    _emit(args, {"name": name, "version": str(version), "alias": args.alias, "previous": before},
          f"{name}@{args.alias} -> version {version}" + (f" (was {before})" if before and before != str(version) else ""))  # fmt: skip
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from tltrain.tracking import registry

    dest = registry.pull(args.ref, args.to_dir, tracking_uri=args.tracking_uri)
    _emit(args, {"ref": args.ref, "dir": str(dest)}, f"checkpoint of {args.ref} verified in {dest}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tltrain.execution.predict import result_json, run_predict
    from tltrain.tracking.scoring import ScoringInputError

    try:
        result = run_predict(args.model, list(args.sources), out=args.out, overwrite=args.overwrite,
                             address=args.address, batch_size=args.batch_size, tracking_uri=args.tracking_uri)  # fmt: skip
    except ScoringInputError as err:  # nothing was scored or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    # stdout: the predictions table (or, with --out, the summary: the rows are in the file); stderr:
    # progress and, with a table, the summary.
    if args.json:
        print(json.dumps(result_json(result, with_rows=args.out is None), default=str))
        print(result.summary(), file=sys.stderr)
    elif args.out is None:
        rows = list(zip(result.rows["path"], result.rows["label"], result.rows["probability"]))
        width = max((len(p) for p, _, _ in rows), default=0)
        for path, label, prob in rows:
            print(f"{path:{width}}  {label}  {prob:.4f}", flush=True)
        if result.on_cluster or result.skipped or result.ignored:
            print(result.summary(), file=sys.stderr)
    else:
        print(result.summary())
    return 0 if len(result.rows) else 1


def add_commands(subparsers: Any) -> None:
    """Register `register`, `registry` and `predict` on the top-level parser's subparsers."""
    p = subparsers.add_parser("register", help="register a checkpoint as an MLflow model version")
    p.add_argument("checkpoint", help="checkpoint directory: local path or s3:// URI")
    p.add_argument("--name", required=True, help="registered model name (e.g. the spec's tracking.registry_name)")
    p.add_argument("--alias", default="challenger", help="alias to point at the version ('' for none)")
    p.add_argument("--run-id", default=None, help="MLflow run to log the model into (its lineage tags are copied)")
    p.add_argument(
        "--experiment", default=None, help="experiment for the registration run (default: the checkpoint spec's)"
    )
    _common(p)
    p.set_defaults(func=cmd_register)

    reg = subparsers.add_parser("registry", help="list, inspect, promote and pull registered models", epilog=_EXAMPLES)
    sub = reg.add_subparsers(dest="registry_command", required=True)
    p = sub.add_parser("list", help="registered models with their aliases")
    _common(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser(
        "show", help="a version's lineage: checkpoint, source weights, dataset, spec, metrics", epilog=_EXAMPLES
    )
    p.add_argument("ref", help="NAME | NAME@ALIAS | NAME/VERSION")
    _common(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("promote", help="point an alias (default champion) at a version", epilog=_EXAMPLES)
    p.add_argument("name", help="NAME (then VERSION), or NAME/VERSION, or NAME@ALIAS")
    p.add_argument("version", nargs="?", default=None, help="version number")
    p.add_argument("--alias", default="champion", help="alias to move")
    _common(p)
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser("pull", help="download and verify a version's checkpoint files", epilog=_EXAMPLES)
    p.add_argument("ref", help="NAME | NAME@ALIAS | NAME/VERSION")
    p.add_argument("to_dir", help="local directory to write the checkpoint into")
    _common(p)
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser(
        "predict",
        help="classify images with a registered model: a few files here, folders and s3:// prefixes on the cluster",
        description="Image files alone (no --out, no --address) are scored in this process; a folder, an s3:// "
        "SOURCE, --out or --address score on the Ray cluster with Ray Data (one GPU per actor when it has GPUs).",
    )
    p.add_argument("model", metavar="MODEL_URI",
                   help="NAME@ALIAS | NAME/VERSION | models:/... | runs:/... | a local model dir")  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="an image file, a local folder (walked recursively) or an s3:// prefix of images")  # fmt: skip
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the predictions as .csv or .parquet (local path or s3://) instead of printing them")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already exists")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",  # None: execution/predict's default
                   help="images per model call and per Ray Data batch (default 64)")  # fmt: skip
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to score on (default: RAY_ADDRESS, a `ray start` cluster on this machine, else a local Ray)",
    )
    _common(p)
    p.set_defaults(func=cmd_predict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tltrain", description="tltrain model registry commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
