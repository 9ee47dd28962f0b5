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


def write_summary_csv(write, location: str, rows: list[dict], fields, json_name: str, say) -> str | None:
    """The summary's rows as CSV, through ``write(text)``; returns ``location``, or None when it could not
    be written: said, not fatal (on Windows the earlier CSV may be open in Excel, which stops it being
    replaced; every result is done by then, and the JSON summary beside it has the same rows)."""
    try:
        write(rows_csv_text(rows, fields))
    except OSError as e:
        say(f"could not write {location} ({e.strerror or e}): if it is open in another program (Excel), close it;"
            f" {json_name} has the same rows")
        return None
    return location
