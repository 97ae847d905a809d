"""The report's compact table: python bench/gap_damping_table.py (reads bench/results/gap_damping*.csv)."""
import csv, glob, os
R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
rows = [r for x in ("", "2", "3", "4", "50") for r in csv.DictReader(open(os.path.join(R, f"gap_damping{x}.csv")))]
get = {(r["model"], r["steps"], r["schedule_name"], r["axis"], r["predictor"]): float(r["psnr"]) for r in rows}
A = "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse:hyp2@shared"
L = "choose:rational+linear+hyp0.5-lin+hyp1-lin+hyp2-lin+hyp4-lin+hyp8-lin+reuse:hyp2-lin@shared"
cols = [("rational σ (today)", "sigma", "rational"), ("rational idx", "index", "rational"), ("linear σ", "sigma", "linear"),
        ("linear idx", "index", "linear"), ("reuse", "sigma", "reuse"), ("d=1/(1+g) σ", "sigma", "harm"),
        ("d=1/(1+g) idx", "index", "harm"), ("gap rule σ", "sigma", "gaprule"), ("gap rule idx", "index", "gaprule"),
        ("auto/branch σ", "sigma", "choose:rational+linear:rational"), ("r/l/reuse per branch σ", "sigma", "choose3"),
        ("chA pooled idx", "index", A), ("chL pooled idx", "index", L)]
print("| model | T | schedule | " + " | ".join(c[0] for c in cols) + " |")
print("|---" * (len(cols) + 3) + "|")
keys = list(dict.fromkeys((r["model"], r["steps"], r["schedule_name"], r["schedule"]) for r in rows))
for m, T, sn, s in keys:
    v = [get.get((m, T, sn, a, p)) for _, a, p in cols]
    best = max(x for x in v if x is not None)
    print(f"| {m} | {T} | {sn} ({s}) | " + " | ".join("-" if x is None else (f"**{x:.2f}**" if x == best else f"{x:.2f}") for x in v) + " |")
