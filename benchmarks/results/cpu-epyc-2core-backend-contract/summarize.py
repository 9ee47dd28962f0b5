"""Summary of the before/after runs in this folder: summary.csv and summary.json (medians and their ratio).

    python benchmarks/results/cpu-epyc-2core-backend-contract/summarize.py
"""
import csv
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
rows = []
for path in sorted(here.glob("bench-*/effiseg_bench.json")):
    result = json.loads(path.read_text(encoding="utf-8"))
    tree, run = path.parent.name.split("-")[1:]
    for entry in result["results"]:
        if entry["backend"] != "ort-cpu" or entry.get("error"):
            continue
        metric = "model_p50_ms" if entry["mode"] == "model" else "e2e_images_per_s"
        value = entry["latency"]["p50_ms"] if entry["mode"] == "model" else entry["latency"]["throughput_ips"]
        rows.append({"tree": tree, "run": int(run), "metric": metric, "value": round(value, 3),
                     "load_average_1min": result["machine"]["load_average"][0], "created": result["created"]})
with open(here / "summary.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
summary = {}
for metric in ("model_p50_ms", "e2e_images_per_s"):
    medians = {tree: statistics.median(r["value"] for r in rows if r["tree"] == tree and r["metric"] == metric)
               for tree in ("before", "after")}
    summary[metric] = {**medians, "after_over_before": round(medians["after"] / medians["before"], 3),
                       "runs": {tree: [r["value"] for r in rows if r["tree"] == tree and r["metric"] == metric]
                                for tree in ("before", "after")}}
overhead = json.loads((here / "call_overhead.json").read_text(encoding="utf-8"))["trees"]
summary["submit_collect_us_tiny_model"] = {tree: {"median": v["median_us"], "min": v["min_us"]}
                                           for tree, v in overhead.items()}
(here / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
print(json.dumps(summary, indent=2))
