"""Each shift's Dice change at every strength with a paired bootstrap interval, overall and for the
smaller and larger half of the polyps (by mask area), from this folder's per_image.csv.

    python training/reports/robustness-default-32ep/breakdown.py [--data DATA]

Writes breakdown.csv beside this file (the numbers REPORT.md quotes at strength 1).
"""
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from effiseg.training.analysis.stats import paired_bootstrap_ci
from effiseg.training.data import DEFAULT_DATA_ROOT, load_split

here = Path(__file__).resolve().parent
data = sys.argv[sys.argv.index("--data") + 1] if "--data" in sys.argv else DEFAULT_DATA_ROOT
dice = defaultdict(dict)
with open(here / "per_image.csv", encoding="utf-8", newline="") as f:
    for r in csv.DictReader(f):
        dice[r["shift"], float(r["strength"])][r["stem"]] = float(r["dice"])
stems = list(dice["clean", 0.0])
clean = np.array([dice["clean", 0.0][s] for s in stems])
masks = {s.stem: s.mask for s in load_split(data, "validation")}
area = np.array([masks[s].mean() for s in stems])
small = area < np.median(area)
rows = []
for (shift, strength), by_stem in dice.items():
    if shift == "clean":
        continue
    x = np.array([by_stem[s] for s in stems])
    ci = paired_bootstrap_ci(clean, x, seed=0)
    rows.append({"shift": shift, "strength": strength, "dice_change": round(ci["mean_diff"], 4),
                 "low": round(ci["low"], 4), "high": round(ci["high"], 4),
                 "images_losing_over_0.1": int(np.sum(x - clean < -0.1)),
                 "change_smaller_half": round(float(np.mean((x - clean)[small])), 4),
                 "change_larger_half": round(float(np.mean((x - clean)[~small])), 4)})
with open(here / "breakdown.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
for r in rows:
    print(r)
