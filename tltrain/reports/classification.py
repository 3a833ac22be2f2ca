"""The final report of a training run: per-class precision/recall/F1 from the best checkpoint's
confusion matrix, and the confusion-matrix and learning-curve plots.

Plain functions of a confusion matrix and the epoch history, apart from tracking.py because they
are one job (turning numbers into a report) that needs no MLflow: they can be tested, or called on
a checkpoint's meta.json, without a tracking store. matplotlib is imported only when a plot is
drawn, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tltrain.core.scores import per_class_scores
from tltrain.spec.metrics import is_metric_value


def classification_report(confusion: list[list[int]], class_names: list[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support from a confusion matrix (rows = true class), plus
    accuracy and macro/weighted averages, in the layout of sklearn's classification_report."""
    n = len(class_names)
    rows = [[int(x) for x in row] for row in confusion]
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"confusion matrix is not {n}x{n} (one row and column per class)")
    total = sum(map(sum, rows))
    out: dict[str, Any] = {}
    for name, scores in zip(class_names, per_class_scores(rows)):
        out[name] = scores
    per_class = [out[name] for name in class_names]
    for avg, weights in (("macro avg", [1] * n), ("weighted avg", [c["support"] for c in per_class])):
        wsum = sum(weights) or 1
        out[avg] = {k: sum(w * c[k] for w, c in zip(weights, per_class)) / wsum for k in ("precision", "recall", "f1")}
        out[avg]["support"] = total
    out["accuracy"] = sum(rows[i][i] for i in range(n)) / total if total else 0.0
    return out


def format_report(rep: dict[str, Any]) -> str:
    width = max([len(k) for k in rep] + [12])
    lines = [f"{'':>{width}}  precision  recall      f1  support"]
    for name, row in rep.items():
        if name == "accuracy":
            continue
        if name == "macro avg":
            lines.append("")
        lines.append(
            f"{name:>{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}  {row['support']:7d}"
        )
    lines.append(f"{'accuracy':>{width}}  {rep['accuracy']:9.3f}")
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_png(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    n = len(class_names)
    size = min(4 + 0.45 * n, 30)
    fig = _figure(size, size)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="validation confusion matrix")
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    if n <= 30:  # beyond that the numbers are unreadable anyway
        peak = max(max(r) for r in confusion) or 1
        for i, row in enumerate(confusion):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)


def learning_curves_png(history: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric kind (loss, acc, ...) with its train/ and val/ curves; one for LRs."""
    panels: dict[str, list[str]] = {}
    keys = sorted({k for h in history for k, v in h.items() if is_metric_value(v)})
    for key in keys:
        split, _, kind = key.partition("/")
        if split in ("train", "val") and kind:
            panels.setdefault(kind, []).append(key)
        elif split == "lr":
            panels.setdefault("lr", []).append(key)
    if not panels:
        return
    x = [h["epoch"] if is_metric_value(h.get("epoch")) else i + 1 for i, h in enumerate(history)]
    fig = _figure(5 * len(panels), 4)
    for i, (kind, series) in enumerate(sorted(panels.items()), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for key in series:
            pts = [(xi, h[key]) for xi, h in zip(x, history) if is_metric_value(h.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set(title=kind, xlabel="epoch")
        if kind == "lr" and all(h[k] > 0 for h in history for k in series if is_metric_value(h.get(k))):
            ax.set_yscale("log")  # layer-wise decay spreads group LRs over decades
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
