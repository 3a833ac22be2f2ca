"""Classification scores from a confusion matrix (rows = true class, columns = predicted).

Plain Python on lists, so the loop (from the all-reduced matrix), the final report and the tests
compute macro-F1 and balanced accuracy one way, and the way scikit-learn does: macro-F1 averages
the classes that occur as a true or a predicted label, balanced accuracy the recall of the classes
that occur as a true label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def per_class_scores(confusion: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """precision, recall, f1 and support of each class, in label order."""
    rows = [[int(x) for x in row] for row in confusion]
    n = len(rows)
    out = []
    for i in range(n):
        tp, support, predicted = rows[i][i], sum(rows[i]), sum(r[i] for r in rows)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    return out


def summary_scores(confusion: Sequence[Sequence[int]]) -> dict[str, float]:
    """acc, f1_macro and balanced_acc (mean recall), as scikit-learn computes them."""
    n = len(confusion)
    scores = per_class_scores(confusion)
    seen = [c for i, c in enumerate(scores) if c["support"] > 0 or any(int(r[i]) for r in confusion)]
    true = [c for c in scores if c["support"] > 0]
    total = sum(c["support"] for c in true)
    correct = sum(int(confusion[i][i]) for i in range(n))
    return {
        "acc": correct / total if total else 0.0,
        "f1_macro": sum(c["f1"] for c in seen) / max(len(seen), 1),
        "balanced_acc": sum(c["recall"] for c in true) / max(len(true), 1),
    }
