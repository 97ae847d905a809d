"""Where the error comes from (diag.csv): the shipped linear with the first skips (steps 1, 2, reuse of
R0) computed exactly, or every later skip computed exactly (neither stored: more compute than the
level; a diagnostic, not a method). Run: python bench/research/predictor_2p5x/diag_table.py"""
import csv, os

rows = list(csv.DictReader(open(os.path.join(os.path.dirname(__file__), "diag.csv"))))
ps = {(r["model"], int(r["steps"]), r["cand"]): float(r["psnr"]) for r in rows}
models = list(dict.fromkeys(r["model"] for r in rows))
cs = ["x12|linear", "xlate|linear", "x12|lin13+ch:0.5"]
print("| model | T | linear | x12: steps 1, 2 exact | xlate: skips after step 3 exact | x12, then lin13+ch:0.5 |")
print("|---|---|---|---|---|---|")
acc = {c: [] for c in cs}
for m in models:
    for T in (10, 20, 28, 50):
        l = ps[(m, T, "linear")]
        cells = []
        for c in cs:
            d = ps[(m, T, c)] - l
            acc[c].append(d)
            cells.append(f"{ps[(m, T, c)]:.2f} ({d:+.2f})")
        print(f"| {m} | {T} | {l:.2f} | " + " | ".join(cells) + " |")
print("| mean minus linear | | | " + " | ".join(f"{sum(v)/len(v):+.2f} (lower at {sum(x < -0.05 for x in v)}/24)" for v in acc.values()) + " |")
