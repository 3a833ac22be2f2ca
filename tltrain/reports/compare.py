"""The table of `tltrain compare`: one row per rung, held-out test scores and cost."""

from __future__ import annotations

from typing import Any, TextIO

from tltrain.spec.metrics import TEST_ACC, TEST_BALANCED_ACC, TEST_F1_MACRO

COLUMNS = (TEST_ACC, TEST_F1_MACRO, TEST_BALANCED_ACC)


def print_comparison(result: dict[str, Any], out: TextIO) -> None:
    rows = result["rungs"]
    header = ["rung", *COLUMNS, "epochs", "worker-s"]
    table = [
        [
            r["rung"],
            *("-" if r[c] is None else f"{r[c]:.3f}" for c in COLUMNS),
            str(r["epochs"]),
            f"{r['worker_s']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print(f"\n== {result['name']}: held-out test split (no run chose anything on it)", file=out)
    for line in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip(), file=out)
    by_rung = {r["rung"]: r for r in rows}
    base = by_rung.get("scratch")
    for r in rows:
        if base is not None and r is not base and r[TEST_ACC] is not None and base[TEST_ACC] is not None:
            print(f"{r['rung']} - scratch: {r[TEST_ACC] - base[TEST_ACC]:+.3f} {TEST_ACC}", file=out)
    registered = [r["registered_model"] for r in rows if r.get("registered_model")]
    if registered:
        print(f"registered: {registered[0]} (alias challenger); try `tltrain registry list`", file=out)
    out.flush()
