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


def format_check_table(
    rows: list[dict[str, Any]], scores: Sequence[str], check: dict[str, Any], *, key: str = "candidate"
) -> str:
    """`rank --fine-tune`: each row's scores beside the accuracy its fine-tune reached, Kendall's
    tau of every score with that accuracy (with n), and what the ranking cost beside the fine-tunes."""
    metric = check["metric"]
    header = ["#", key, *scores, metric, "fine-tune s"]
    body = [
        [str(i), str(row[key]), *(_cell(row["scores"].get(s)) for s in scores), _cell(row["fine_tuned"]),
         "reused" if row.get("reused") else f"{row['fine_tune_s']:.0f}"]
        for i, row in enumerate(rows, start=1)
    ]  # fmt: skip
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]  # fmt: skip
    lines.append(f"Kendall tau-b of each score with {metric} (1 = same order, -1 = reversed):")
    for among in dict.fromkeys(t["among"] for t in check["correlations"]):
        taus = [t for t in check["correlations"] if t["among"] == among]
        n = max(t["n"] for t in taus)
        # A score some rows lack (LEEP/NCE without a source head) is correlated over fewer: say so.
        cells = [
            f"{t['score']} {'-' if t['tau'] is None else format(t['tau'], '+.2f')}"
            + (f" (n={t['n']})" if t["n"] != n else "")
            for t in taus
        ]
        lines.append(f"  {among} (n={n}): " + ", ".join(cells))
    ratio = check["fine_tune_s"] / check["rank_s"] if check["rank_s"] else float("inf")
    reused = f"; {check['reused']} reused from an earlier check, not counted" if check.get("reused") else ""
    lines.append(
        f"cost (wall): the ranking {check['rank_s']:.0f} s, the {check['fine_tunes']} fine-tunes "
        f"{check['fine_tune_s']:.0f} s ({ratio:.0f}x the ranking){reused}"
    )
    return "\n".join(lines)
