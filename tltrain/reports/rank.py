"""`tltrain rank`'s table: candidates (or freeze depths) best first, one column per score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_rank_table(rows: list[dict[str, Any]], scores: Sequence[str], *, key: str = "candidate") -> str:
    """rows (already ordered) with `key`, `scores` {name: value | None}, feature_dim, images,
    seconds and an optional note; a score a row has no value for shows "-"."""
    header = ["#", key, *scores, "dim", "images", "s"]
    body = [
        [
            str(i),
            str(row[key]),
            *(_cell(row["scores"].get(s)) for s in scores),
            str(row["feature_dim"]),
            str(row["images"]),
            f"{row['seconds']:.1f}",
        ]
        for i, row in enumerate(rows, start=1)
    ]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]  # fmt: skip
    notes = [f"  {row[key]}: {row['note']}" for row in rows if row.get("note")]
    return "\n".join(lines + (["notes:", *notes] if notes else []))
