"""Where the tests find Kvasir-SEG: $EFFISEG_DATA, else ../shared/data/kvasir-seg beside the repo."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KVASIR = Path(os.environ.get("EFFISEG_DATA", REPO.parent / "shared" / "data" / "kvasir-seg"))
needs_kvasir = pytest.mark.skipif(not (KVASIR / "train" / "images").is_dir(),
                                  reason=f"Kvasir-SEG not found at {KVASIR} (set EFFISEG_DATA)")
