"""Where the tests find Kvasir-SEG: $EFFISEG_DATA, else ../shared/data/kvasir-seg beside the repo."""
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KVASIR = Path(os.environ.get("EFFISEG_DATA", REPO.parent / "shared" / "data" / "kvasir-seg"))
needs_kvasir = pytest.mark.skipif(not (KVASIR / "train" / "images").is_dir(),
                                  reason=f"Kvasir-SEG not found at {KVASIR} (set EFFISEG_DATA)")


def copy_kvasir_subset(dest: Path, splits=("validation", "test"), stems=("0", "1")) -> Path:
    """A tiny Kvasir-SEG root at ``dest``: the given image/mask pairs of each split, same layout."""
    for split in splits:
        for sub in ("images", "masks"):
            (dest / split / sub).mkdir(parents=True)
            for stem in stems:
                shutil.copy(KVASIR / split / sub / f"{stem}.jpg", dest / split / sub / f"{stem}.jpg")
    return dest
