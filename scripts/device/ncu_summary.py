"""Sums Nsight Compute's per-kernel durations (`ncu --metrics gpu__time_duration.sum --csv
--log-file FILE`) by kernel name, largest first: count, total and share.

Usage: python3 ncu_summary.py FILE
"""
import csv
import sys
from collections import defaultdict

UNIT = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}

rows = [line for line in open(sys.argv[1]) if not line.startswith("==")]
totals, counts = defaultdict(float), defaultdict(int)
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0][:60]
    value = float(r["Metric Value"].replace(",", ""))
    totals[name] += value * UNIT.get(r["Metric Unit"], 1.0)
    counts[name] += 1
whole = sum(totals.values())
print(f"{len(counts)} kernels, {sum(counts.values())} launches, {whole / 1e3:.2f} ms in all")
for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{t / 1e3:9.3f} ms {100 * t / whole:5.1f} % {counts[name]:6d}  {name}")
