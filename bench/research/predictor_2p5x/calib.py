"""Upper bounds and per-model calibration from the 2.5x rows (CSV with all candidates):
- oracle: per point the best candidate (in-sample, not a predictor);
- per-model leave-one-T-out choice: for each model and held-out T, the candidate (within a family)
  with the best mean PSNR at that model's other three step counts, scored at the held-out T
  (what a per-model calibration, as bench/research/linear_calibration does for linear, could reach).
Run: PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x python bench/research/predictor_2p5x/calib.py CSV[,CSV...]"""
import csv, sys
from collections import defaultdict
from defaults import best_peers

rows = [r for p in sys.argv[1].split(",") for r in csv.DictReader(open(p)) if abs(float(r["level"]) - 2.5) < 1e-3 and r["cand"] != "lib_linear"]
ps = {(r["model"], int(r["steps"]), r["cand"]): float(r["psnr"]) for r in rows}
models = list(dict.fromkeys(r["model"] for r in rows))
Ts = sorted({int(r["steps"]) for r in rows})
peers = best_peers(models)
cands = list(dict.fromkeys(r["cand"] for r in rows))
pts = [(m, T) for m in models for T in Ts]
peer = {p: peers[(p[0], p[1], 2.5)][0] for p in pts}


def report(label, val):
    dl = [val[p] - ps[p + ("linear",)] for p in pts]
    dp = [val[p] - peer[p] for p in pts]
    print(f"| {label} | {sum(dl)/len(dl):+.2f} | {min(dl):+.2f} | {sum(d < -0.05 for d in dl)} | {sum(dp)/len(dp):+.2f} | "
          f"{sum(d >= 2 for d in dp)}/{len(dp)} | {sum(d < 0 for d in dp)} |")


print("| rule | mean - linear | worst - linear | losses vs linear | mean - best peer | >= 2 dB | < peer |")
print("|---|---|---|---|---|---|---|")
report("oracle: best of all candidates per point (in-sample bound)", {p: max(ps[p + (c,)] for c in cands if p + (c,) in ps) for p in pts})
fams = {"all candidates": cands,
        "mix a in {-0.25, 0, .15, .3, .5, .75, 1}": ["mix:-0.25", "linear", "mix:0.15", "mix:0.3", "mix:0.5", "mix:0.75", "mix:1"],
        "linear / lin13 / lin13+ch:0.5 / reuse / rational": ["linear", "lin13", "lin13+ch:0.5", "reuse", "rational"]}
for name, fam in fams.items():
    fam = [c for c in fam if all(p + (c,) in ps for p in pts)]
    val, picks = {}, defaultdict(list)
    for m in models:
        for T in Ts:
            c = max(fam, key=lambda c: sum(ps[(m, t, c)] for t in Ts if t != T))
            val[(m, T)] = ps[(m, T, c)]
            picks[m].append(c)
    report(f"per-model leave-one-T-out choice among {name}", val)
    print("|  picks: " + "; ".join(f"{m}: {' '.join(v)}" for m, v in picks.items()) + " |||||||")
