"""``os.replace`` that rides out Windows' short-lived file locks.

On Windows a rename onto a file fails with PermissionError while any process has that file open
without delete sharing: an antivirus scan, the search indexer, OneDrive, an image viewer, another
effiseg process reading an engine. Those hold a file for milliseconds, so a few retries over about
three seconds succeed; a file held for good (a CSV open in Excel) still fails, and the caller says so.
"""
from __future__ import annotations

import os
import time


def replace_with_retry(src: str | os.PathLike, dst: str | os.PathLike, attempts: int = 10) -> None:
    for attempt in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
