"""Margins over the best peer (quality_<model>.csv) of placement.csv's rules; leave-one-model-out.
Run: PYTHONPATH=bench python bench/research/stack_output/analyse.py bench/research/stack_output/placement.csv"""
import csv, sys
from collections import defaultdict
from defaults import best_peers

rows = list(csv.DictReader(open(sys.argv[1])))
models = list(dict.fromkeys(r["model"] for r in rows))
peers = best_peers(models)
margin = {}
for r in rows:
    p = peers.get((r["model"], int(r["steps"]), float(r["level"])))
    if p:
        margin[(r["model"], int(r["steps"]), r["tag"], (r["placement"], r["predictor"], r["target"]))] = float(r["psnr"]) - p[0]
rules = list(dict.fromkeys(k[3] for k in margin))
points = sorted({k[:3] for k in margin})


def mean(rule, keep):
    v = [margin[p + (rule,)] for p in points if keep(p) and p + (rule,) in margin]
    return sum(v) / len(v) if v else float("-inf")


print("rule | " + " | ".join(models) + " | all | >=2dB")
for rule in rules:
    n2 = sum(margin.get(p + (rule,), -99) >= 2 for p in points)
    print("/".join(rule), "|", " | ".join(f"{mean(rule, lambda p, m=m: p[0] == m):+.2f}" for m in models),
          f"| {mean(rule, lambda p: True):+.2f} | {n2}/{len(points)}")
for T in (10, 20, 28, 50):
    print(f"T={T}:", " ".join(f"{'/'.join(r)}={mean(r, lambda p: p[1] == T):+.2f}" for r in rules))
tot = ok = 0
for held in models:
    rule = max(rules, key=lambda r: mean(r, lambda p: p[0] != held))
    vals = [margin[p + (rule,)] for p in points if p[0] == held]
    ok += sum(v >= 2 for v in vals); tot += len(vals)
    print("LOMO", held, "/".join(rule), f"{sum(vals) / len(vals):+.2f}", " ".join(f"{v:+.1f}" for v in vals))
print(f"LOMO goal met {ok}/{tot}")
