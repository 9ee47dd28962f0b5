"""What Windows does to file names, for outputs named after inputs that did not come from Windows.

Windows (Win32 paths, as Python uses them) refuses names with ``< > : " / \\ | ? *`` or a control
character, and the device names CON, PRN, AUX, NUL, COM1-9, LPT1-9 (with any extension: ``nul.png``
is the device); it silently drops trailing dots and spaces (``clip.`` and ``clip`` are one folder)
and ignores case. Object keys (S3, GCS) and files from Linux or macOS may carry any of these.
"""
from __future__ import annotations

import os

ON_WINDOWS = os.name == "nt"
FORBIDDEN_CHARACTERS = '<>:"/\\|?*'
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def windows_name_problem(rel: str) -> str | None:
    """Why Windows cannot hold ``rel`` ("/"-separated relative path) as written, or None."""
    for part in rel.split("/"):
        bad = sorted({c for c in part if c in FORBIDDEN_CHARACTERS or ord(c) < 32})
        if bad:
            return f"{part!r} has {' '.join(repr(c) for c in bad)}, which Windows does not allow in a name"
        if part != part.rstrip(". "):
            return f"{part!r} ends in a dot or a space, which Windows drops"
        if part.split(".")[0].rstrip(" ").upper() in RESERVED_NAMES:
            return f"{part!r} is a device name on Windows ({part.split('.')[0].rstrip(' ').upper()})"
    return None


def windows_path_key(rel: str) -> str:
    """``rel`` ("/"-separated) as Windows tells paths apart: two paths with one key are one file or
    folder there (case ignored, trailing dots and spaces of each part dropped)."""
    return "/".join(part.rstrip(". ") for part in rel.casefold().split("/"))
