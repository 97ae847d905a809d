"""Tables from bench/results/gap_damping.csv: python bench/gap_damping_report.py [csv]"""
import csv, os, sys
from collections import defaultdict
R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
paths = sys.argv[1:] or [os.path.join(R, f"gap_damping{x}.csv") for x in ("", "2", "3", "4", "50")]
rows = [r for p in paths if os.path.exists(p) for r in csv.DictReader(open(p))]
short = {"choose:rational+linear+reuse:reuse": "ch3/reuse0", "choose:rational+linear+reuse:harm": "ch3/harm0",
         "choose:rational+linear+reuse+harm:harm": "ch4/harm0", "choose:rational+reuse:rational": "ch(rat,reuse)",
         "choose:rational+linear:rational": "auto(rat,lin)", "choose3": "ch3/rat0",
         "choose3@shared": "ch3/rat0@sh", "choose:rational+linear+reuse:reuse@shared": "ch3/reuse0@sh",
         "choose:rational+linear+reuse+hyp3:hyp3@shared": "ch(r,l,reuse,hyp3)@sh",
         "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse:hyp2@shared": "chA@sh",
         "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse:hyp2:last@shared": "chA-last@sh",
         "choose:rational+linear:rational@shared": "auto@sh", "harm": "hyp1",
         "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse:hyp1@shared": "chA/hyp1-0@sh",
         "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse+linear+hyp0.5-lin+hyp1-lin+hyp2-lin:hyp1@shared": "chB/hyp1-0@sh",
         "choose:rational+hyp0.5+hyp1+hyp2+hyp4+hyp8+reuse:hyp2": "chA (per branch)",
         "choose:rational+linear+hyp0.5-lin+hyp1-lin+hyp2-lin+hyp4-lin+hyp8-lin+reuse:hyp2-lin@shared": "chL@sh",
         "choose:rational+linear+hyp0.5-lin+hyp1-lin+hyp2-lin+hyp4-lin+hyp8-lin+reuse:hyp2-lin": "chL (per branch)"}
ONLY = os.environ.get("PREDS")
preds = list(dict.fromkeys(r["predictor"] for r in rows))
if ONLY:
    preds = [x for x in preds if short.get(x, x) in ONLY.split(";")]
STEPS = os.environ.get("STEPS")
keys = list(dict.fromkeys((r["model"], r["steps"], r["schedule_name"], r["schedule"]) for r in rows
                          if not STEPS or r["steps"] in STEPS.split(",")))
get = {(r["model"], r["steps"], r["schedule_name"], r["axis"], r["predictor"]): float(r["psnr"]) for r in rows}
for axis in ("sigma", "index"):
    print(f"\n### axis: {axis} (reuse: axis-free)\n")
    print("| model | T | schedule | " + " | ".join(short.get(x, x) for x in preds) + " |")
    print("|---" * (len(preds) + 3) + "|")
    for m, T, sn, s in keys:
        vals = [get.get((m, T, sn, axis if x != "reuse" else "sigma", x)) for x in preds]
        best = max(v for v in vals if v is not None)
        cells = ["-" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}") for v in vals]
        print(f"| {m} | {T} | {sn} ({s}) | " + " | ".join(cells) + " |")
# mean margin over rational(sigma) and over reuse, min margin, per predictor x axis
print("\n### per predictor x axis: mean / min of (PSNR - rational sigma), (PSNR - reuse), (PSNR - best of rational, linear, reuse on any axis) over all rows\n")
print("| predictor | axis | mean - rational | min - rational | mean - reuse | min - reuse | mean - best fixed | min - best fixed | within 0.5 dB of best fixed | rows |")
print("|---|---|---|---|---|---|---|---|---|---|")
for x in preds:
    for axis in ("sigma", "index"):
        if x == "reuse" and axis == "index":
            continue
        d1, d2, d3 = [], [], []
        for m, T, sn, s in keys:
            v = get.get((m, T, sn, axis, x))
            if v is None:
                continue
            rat, reu = get[(m, T, sn, "sigma", "rational")], get[(m, T, sn, "sigma", "reuse")]
            bf = max(get.get((m, T, sn, a, q), -1e9) for a in ("sigma", "index") for q in ("rational", "linear", "reuse"))
            d1.append(v - rat); d2.append(v - reu); d3.append(v - bf)
        if d1:
            print(f"| {short.get(x, x)} | {axis} | {sum(d1)/len(d1):+.2f} | {min(d1):+.2f} | {sum(d2)/len(d2):+.2f} | {min(d2):+.2f} | {sum(d3)/len(d3):+.2f} | {min(d3):+.2f} | {sum(x >= -0.5 for x in d3)} | {len(d1)} |")
