"""Summary rows as CSV text: one column per field, empty cells for missing values (None)."""
from __future__ import annotations

import csv
import io


def rows_csv_text(rows: list[dict], fields) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return text.getvalue()
