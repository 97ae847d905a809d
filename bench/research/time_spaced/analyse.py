"""Per alpha: mean gain over alpha = 0 (the spaced rule), points >= 2 dB over the best peer, worst loss.
Run: python bench/research/time_spaced/analyse.py A.csv[,B.csv] [-v]"""
import collections
import csv
import sys

rows = [r for p in sys.argv[1].split(",") for r in csv.DictReader(open(p))]
by = collections.defaultdict(dict)
for r in rows:
    by[(r["model"], int(r["steps"]), float(r["level"]))][float(r["alpha"])] = (float(r["psnr"]), float(r["peer"]))
alphas = sorted({a for v in by.values() for a in v})
print(f"{len(by)} points")
for a in alphas:
    pts = [v for v in by.values() if a in v and 0.0 in v]
    g = [v[a][0] - v[0.0][0] for v in pts]
    met = sum(v[a][0] - v[a][1] >= 2 for v in pts)
    print(f"alpha {a:5.3f}: mean gain {sum(g) / len(g):+.2f} dB over {len(g)}, wins {sum(x > 0.05 for x in g)}, "
          f"losses {sum(x < -0.05 for x in g)}, worst {min(g):+.2f}, best {max(g):+.2f}; >= 2 dB over peer {met}")
    for T in sorted({k[1] for k in by}):
        gt = [v[a][0] - v[0.0][0] for k, v in by.items() if k[1] == T and a in v and 0.0 in v]
        if gt:
            print(f"     T={T}: mean {sum(gt) / len(gt):+.2f} over {len(gt)}, worst {min(gt):+.2f}")
if "-v" in sys.argv:
    for k, v in sorted(by.items()):
        print(k, " ".join(f"{a:g}={v[a][0]:.2f}" for a in alphas if a in v), f"peer={next(iter(v.values()))[1]:.2f}")
