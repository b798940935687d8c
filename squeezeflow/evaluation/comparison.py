"""A sweep's comparison table, as markdown, CSV and JSON bytes (deterministic: same metrics, same bytes)."""
from __future__ import annotations

import csv
import io

from ..store import canonical_json
from .report import split_label


def comparison_rows(metrics: list[dict]) -> list[dict]:
    rows = []
    for m in metrics:
        row = {"recipe": m["recipe"], "bits_per_weight": round(m["bits_per_weight"], 4), "size_bytes": m["size_bytes"],
               "sparsity": round(m.get("weight_sparsity", 0.0), 4)}
        row.update({f"ppl_{split_label(k, m['perplexity'])}": round(v, 4) for k, v in sorted(m["perplexity"].items())})
        row["uri"] = m.get("uri") or ""
        rows.append(row)
    return rows


def comparison_files(metrics: list[dict]) -> dict[str, bytes]:
    rows = comparison_rows(metrics)
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return {"comparison.md": ("\n".join(md) + "\n").encode(), "comparison.csv": buf.getvalue().encode(),
            "comparison.json": canonical_json({"results": metrics})}
