"""Margins of each candidate: over the shipped linear (same runs) and over the best peer of
bench/results/quality_<model>.csv at the level (bench/defaults.py's best_peers: group not "full",
not "tcpade*", speedup >= level * 0.999, highest PSNR).
Run: PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x python bench/research/predictor_2p5x/analyse.py CSV[,CSV...] [LEVEL] [--points]"""
import csv, sys
from collections import defaultdict
from defaults import best_peers

rows = [r for p in sys.argv[1].split(",") for r in csv.DictReader(open(p))]
level = float(sys.argv[2]) if len(sys.argv) > 2 and not sys.argv[2].startswith("-") else 2.5
rows = [r for r in rows if abs(float(r["level"]) - level) < 1e-3]
models = list(dict.fromkeys(r["model"] for r in rows))
peers = best_peers(models)
ps = {(r["model"], int(r["steps"]), r["cand"]): float(r["psnr"]) for r in rows}
points = list(dict.fromkeys((r["model"], int(r["steps"])) for r in rows))
cands = list(dict.fromkeys(r["cand"] for r in rows))
peer = {p: peers.get((p[0], p[1], round(level, 4))) for p in points}
print(f"level {level:g}: {len(points)} points")
print("| candidate | mean - linear | worst - linear | wins/losses vs linear (>0.05 dB) | mean - best peer | points >= 2 dB | points < 0 |")
print("|---|---|---|---|---|---|---|")
for c in cands:
    pts = [p for p in points if p + (c,) in ps and p + ("linear",) in ps]
    dl = [ps[p + (c,)] - ps[p + ("linear",)] for p in pts]
    dp = [ps[p + (c,)] - peer[p][0] for p in pts if peer[p]]
    if not dl:
        continue
    print(f"| {c} | {sum(dl)/len(dl):+.2f} | {min(dl):+.2f} | {sum(d > 0.05 for d in dl)}/{sum(d < -0.05 for d in dl)} of {len(dl)} "
          f"| {sum(dp)/max(1,len(dp)):+.2f} | {sum(d >= 2 for d in dp)}/{len(dp)} | {sum(d < 0 for d in dp)} |")
if "--points" in sys.argv:
    show = [c for c in sys.argv[sys.argv.index("--points") + 1].split(",")] if len(sys.argv) > sys.argv.index("--points") + 1 else cands
    print()
    print("| model | T | K | best peer | linear | " + " | ".join(f"{c} (-peer / -linear)" for c in show) + " |")
    print("|---" * (5 + len(show)) + "|")
    for p in points:
        pe = peer[p]
        lin = ps.get(p + ("linear",))
        K = next(r["passes"] for r in rows if (r["model"], int(r["steps"])) == p)
        cells = []
        for c in show:
            v = ps.get(p + (c,))
            cells.append("" if v is None else f"{v:.2f} ({v - pe[0]:+.2f} / {v - lin:+.2f})")
        print(f"| {p[0]} | {p[1]} | {K} | {pe[0]:.2f} {pe[1]} | {lin:.2f} ({lin - pe[0]:+.2f}) | " + " | ".join(cells) + " |")
