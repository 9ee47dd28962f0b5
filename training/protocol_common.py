"""What the improvement protocol's driver (protocol.py), its report (protocol_report.py) and the
step that ships its winner (ship.py) share: the names of the inference settings every run is scored
under, and what a run folder says about how far its training got.

It lives apart so that those three import it and not each other: the driver runs the report and the
ship step, and both read keys and run folders the driver wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from effiseg.runtime.model_info import parse_tta_sizes

# The inference grid every run is evaluated on (tta_study.py chooses from the same thresholds).
THRESHOLDS = [round(t, 2) for t in np.arange(0.3, 0.71, 0.05)]
MIN_REGIONS = [0, 64, 256, 1024]


def inference_configs() -> list[tuple[float, int]]:
    """(threshold, min_region_px) pairs: the threshold grid without region removal, and the
    region-removal grid at the default threshold (a full grid costs time and adds little)."""
    return [(t, 0) for t in THRESHOLDS] + [(0.5, m) for m in MIN_REGIONS if m > 0]


def config_key(tta: bool, threshold: float, min_region: int, tta_sizes=()) -> str:
    """``tta=1,thr=0.45,minreg=0`` (``,sizes=352+416`` with multi-scale TTA): one inference setting."""
    key = f"tta={int(tta)},thr={threshold:.2f},minreg={min_region}"
    return key + (f",sizes={'+'.join(str(s) for s in tta_sizes)}" if tta_sizes else "")


def parse_config_key(key: str) -> dict:
    """A :func:`config_key` back to the checkpoint settings it stands for (``tta``, ``threshold``,
    ``min_region_px``, ``tta_sizes``); ValueError when it is not one."""
    try:
        parts = dict(item.split("=", 1) for item in key.split(","))
        return {"tta": bool(int(parts["tta"])), "threshold": float(parts["thr"]),
                "min_region_px": int(parts["minreg"]),
                "tta_sizes": list(parse_tta_sizes(parts.get("sizes", "").replace("+", ",")))}
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot read the inference settings {key!r}: {e}") from None


def multiscale_sizes(input_size: int) -> tuple[int, ...]:
    """The multi-scale candidate evaluated for every run: the input size and 64 px more (352 ->
    352+416, the set chosen on one model's validation images before any run of the protocol used
    it: training/reports/multiscale-tta-validation)."""
    return parse_tta_sizes([input_size, input_size + 64])


PLAIN = config_key(False, 0.5, 0)


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_training_extent(run_dir: Path) -> dict | None:
    """Epochs planned and completed, and the best epoch, from a run folder's own files (None when
    they are missing): a run stopped early (a session's deadline) has fewer completed than planned."""
    config, history, best = (_read(run_dir / n) for n in ("run_config.json", "metrics.json", "best.json"))
    if not config or not isinstance(history, list):
        return None
    completed = max((int(h.get("epoch", 0)) for h in history), default=0)
    return {"planned": int(config.get("train", {}).get("epochs", 0)), "completed": completed,
            "best_epoch": (best or {}).get("best_epoch")}


def training_extent(out: Path, arms: dict[str, dict[int, dict]]) -> dict:
    """Per evaluated run: epochs planned and completed; 'cut_short' lists the runs that stopped early."""
    runs = {}
    for arm, by_seed in arms.items():
        for seed in by_seed:
            extent = run_training_extent(out / "runs" / f"{arm}_s{seed}")
            if extent is not None:
                runs[f"{arm}_s{seed}"] = extent
    cut = sorted(r for r, e in runs.items() if e["completed"] < e["planned"])
    return {"runs": runs, "cut_short": cut}


def describe_cut_short(training: dict) -> str | None:
    """One sentence for reports and cards when runs stopped before their planned epochs."""
    cut = training.get("cut_short") or []
    if not cut:
        return None
    runs = training["runs"]
    done = [runs[r]["completed"] for r in cut]
    planned = sorted({runs[r]["planned"] for r in cut})
    after = f"{min(done)}" if min(done) == max(done) else f"{min(done)}-{max(done)}"
    return (f"{len(cut)} of {len(runs)} runs stopped before their planned {'/'.join(map(str, planned))} epochs, "
            f"after {after} (e.g. at a session's deadline): their learning-rate schedule did not finish, and "
            "each was evaluated at its best validation checkpoint so far")
