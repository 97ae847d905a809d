"""Margins of the cfg_delta grid: per mode, mean gain over "own" (the library's linear) and points
>= 2 dB over the best peer. Run: python bench/research/cfg_delta/analyse.py grid.csv"""
import collections
import csv
import sys

rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["m"] == "0"]
by = collections.defaultdict(dict)
for r in rows:
    by[(r["model"], int(r["steps"]), float(r["level"]))][r["mode"]] = (float(r["psnr"]), float(r["peer"]))
modes = sorted({r["mode"] for r in rows})
print(f"{len(by)} points")
for mode in modes:
    g = [v[mode][0] - v["own"][0] for v in by.values() if mode in v and "own" in v]
    met = sum(v[mode][0] - v[mode][1] >= 2 for v in by.values() if mode in v)
    wins = sum(x > 0.05 for x in g)
    losses = sum(x < -0.05 for x in g)
    print(f"{mode:10s} mean gain over own {sum(g) / len(g):+.2f} dB, best {max(g):+.2f}, worst {min(g):+.2f}, "
          f"wins {wins}, losses {losses}; >= 2 dB over peer at {met} of {len(g)}")
if "-v" in sys.argv:
    for k, v in sorted(by.items()):
        print(k, " ".join(f"{m}={v[m][0]:.2f}" for m in modes if m in v), f"peer={v['own'][1]:.2f}")
