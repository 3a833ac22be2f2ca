"""The package layout keeps its promises (docs/ARCHITECTURE.md): layers import one way, Ray lives in
execution/ only, the torch-only layers pull in no cluster or tracking client, metric names have one
home, and the checkpoint format is the typed CheckpointMeta (old meta.json files still load)."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tltrain.core.checkpoint import CheckpointMeta, LoopState, load_meta
from tltrain.spec import metrics

PACKAGE = Path(__file__).resolve().parents[1] / "tltrain"
DOCS = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
FIXTURES = Path(__file__).parent / "data" / "checkpoint_meta"

CLIENTS = ("ray", "mlflow", "boto3", "botocore", "pyarrow")
LAYERS = ("spec", "core", "data", "storage", "execution", "tracking", "reports", "commands")
# Which tltrain layers each layer may import (the direction of docs/ARCHITECTURE.md's diagram).
ALLOWED = {
    "spec": set(),
    "core": {"spec"},
    "data": {"spec"},
    "reports": {"spec", "core"},
    "storage": {"spec"},
    "tracking": {"spec", "core", "storage", "reports"},
    "execution": {"spec", "core", "data", "storage", "tracking", "reports"},
    "commands": {"spec", "core", "data", "storage", "tracking", "reports", "execution", "commands"},
}


def _modules(layer: str | None = None) -> list[Path]:
    root = PACKAGE / layer if layer else PACKAGE
    return sorted(p for p in root.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module an import statement names, at any depth (a lazy import in a function counts)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "tltrain":  # from tltrain import storage
                names += [f"tltrain.{a.name}" for a in node.names]
    return names


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("layer", ["core", "data", "reports", "spec"])
def test_torch_only_layers_import_no_cluster_storage_or_tracking_client(layer: str) -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in _modules(layer)
        for name in _imports(path)
        if _top(name) in CLIENTS
    ]
    assert offenders == []


def test_ray_is_imported_only_in_execution() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in _modules()
        if path.relative_to(PACKAGE).parts[0] != "execution"
        for name in _imports(path)
        if _top(name) == "ray"
    ]
    assert offenders == []


def test_layers_import_one_way() -> None:
    offenders = []
    for layer in LAYERS:
        for path in _modules(layer):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "tltrain" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != layer:
                    if parts[1] not in ALLOWED[layer]:
                        offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_no_modules_left_at_the_old_flat_paths() -> None:
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "cli.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_importing_core_data_and_reports_loads_no_client() -> None:
    code = (
        "import sys, tltrain.core, tltrain.core.loop, tltrain.core.plan, tltrain.data, tltrain.data.device, "
        "tltrain.data.nvjpeg, tltrain.reports, tltrain.reports.sweep, tltrain.reports.progress, tltrain.spec.search; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({CLIENTS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_lora_runs_import_peft() -> None:
    """peft (and the transformers it pulls in, seconds of import) is loaded by LoRA code paths only."""
    code = (
        "import sys, tltrain.cli, tltrain.core.loop, tltrain.execution.worker, tltrain.execution.preflight, "
        "tltrain.execution.evaluate, tltrain.tracking.registry; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_metric_names_are_written_only_in_spec_metrics() -> None:
    names = {v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str)}
    assert {"val/acc", "train/loss", "img_per_s"} <= names  # the constants the rest of the code imports
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"""["']({alternatives})["']""")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
        for path in _modules()
        if path.name != "metrics.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_a_meta_json_written_before_checkpoint_meta_existed_still_loads(tmp_path: Path) -> None:
    # Written by `tltrain train` at commit 545d0c6 (the untyped dict), test_resnet, 1 epoch.
    (fixture,) = FIXTURES.glob("meta-*.json")
    raw = json.loads(fixture.read_text())
    (tmp_path / "meta.json").write_text(fixture.read_text())
    meta = load_meta(tmp_path)
    assert isinstance(meta.loop_state, LoopState)
    assert meta.class_names == raw["class_names"] and len(meta.class_names) == 10
    assert meta.epoch == raw["epoch"] == 1 and meta.loop_state.epoch == 1
    assert meta.loop_state.history[0]["epoch"] == 1
    assert meta.metrics["val/acc"] == raw["metrics"]["val/acc"]
    assert meta.layer_groups == raw["layer_groups"] and meta.layer_groups[-1] == "head"
    assert meta.dataset_fingerprint == raw["dataset_fingerprint"]
    # Every key of the old format is a field (nothing is dropped on the way through the class)...
    fields = {f.name for f in dataclasses.fields(CheckpointMeta)}
    assert set(raw) <= fields
    # ...the fields added since get the value that old run meant (it had no EMA twin)...
    added = {"exported_weights": "raw"}
    assert fields - set(raw) == set(added)
    # ...and writing it back gives the same document, plus those.
    assert json.loads(meta.to_json()) == {**raw, **added}


def test_a_meta_json_from_an_older_version_gets_defaults() -> None:
    meta = CheckpointMeta.from_dict({"epoch": 3, "class_names": ["a", "b"], "model_name": "m", "unknown_key": 1})
    assert meta.epoch == 3 and meta.invalid_checkpoints == [] and meta.loop_state == LoopState()


def test_architecture_doc_lists_the_checkpoint_meta_fields_and_every_module() -> None:
    doc = DOCS.read_text()
    table = doc.split("<!-- meta.json fields -->", 1)[1].split("<!-- end -->", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert documented == [f.name for f in dataclasses.fields(CheckpointMeta)]
    missing = [str(p.relative_to(PACKAGE)) for p in _modules() if p.name != "__init__.py" and f"`{p.name}`" not in doc]
    assert missing == []
