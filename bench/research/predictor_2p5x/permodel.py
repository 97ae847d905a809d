"""Per-model means at 2.5x (margin over the best peer / over linear) and per-T means over the best peer.
Run: PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x python bench/research/predictor_2p5x/permodel.py CSV[,CSV...] CAND[,CAND...]"""
import csv, sys
from defaults import best_peers

rows = [r for p in sys.argv[1].split(",") for r in csv.DictReader(open(p)) if r["level"] == "2.5"]
ps = {(r["model"], int(r["steps"]), r["cand"]): float(r["psnr"]) for r in rows}
models = list(dict.fromkeys(r["model"] for r in rows))
pe = best_peers(models)
print("| candidate | " + " | ".join(models) + " | T=10 | T=20 | T=28 | T=50 |")
print("|---" * (5 + len(models)) + "|")
for c in sys.argv[2].split(","):
    out = []
    for m in models:
        dl = [ps[(m, T, c)] - ps[(m, T, "linear")] for T in (10, 20, 28, 50)]
        dp = [ps[(m, T, c)] - pe[(m, T, 2.5)][0] for T in (10, 20, 28, 50)]
        out.append(f"{sum(dp)/4:+.2f} / {sum(dl)/4:+.2f}")
    byT = [f"{sum(ps[(m, T, c)] - pe[(m, T, 2.5)][0] for m in models)/len(models):+.2f}" for T in (10, 20, 28, 50)]
    print(f"| {c} | " + " | ".join(out) + " | " + " | ".join(byT) + " |")
