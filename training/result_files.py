"""Result files (JSON, per-image CSV) written whole. Without torch: ``effiseg-score`` runs on an
inference install (``effiseg[ort]``) and writes these too."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from effiseg.runtime.images import atomic_write_text


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    """Rows as a UTF-8 CSV, replaced whole (a reader never sees half a file)."""
    text = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(text, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON, replaced whole (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))
