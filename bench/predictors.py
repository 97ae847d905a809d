"""The online predictor choice ("auto") against each fixed predictor on the same schedules.

    python bench/predictors.py                                  # every zoo model, 20 and 50 steps
    python bench/predictors.py --models flux-digits --steps 20

For each zoo model and step count T, at the pass counts of the benchmark's speedup levels (2x,
2.5x, 2.9x; at 50 steps also 3x and 4x), on two schedules per pass count -- the model's
calibrated schedule (tcpade/zoo/schedules.json, searched with the rational predictor) and the
spaced rule (``TCPadeConfig.budget(passes=K, use_calibrated=False)``) -- every predictor runs the
same computed steps: rational, linear, reuse, paper (its predictor alone, no stored predictions)
and auto (the online choice among rational, linear, damped linear and reuse, one choice for
the CFG branches of a step). PSNR against full computation of bench/quality.py's evaluation inputs (the sample
counts of bench/results/quality_meta.json). Goal: auto within 0.5 dB of the best fixed predictor
on every schedule.

Writes bench/results/predictors.md and predictors.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name
from quality import eval_set

from tcpade import metrics, schedules, zoo
from tcpade.tools.calibrate import shipped
from tcpade.policy.config import TCPadeConfig

OUT = os.path.join(ROOT, "bench", "results")
PREDICTORS = ("rational", "linear", "reuse", "paper", "auto")
FIXED = PREDICTORS[:-1]
MODELS = ("flux-digits", "wan-digits", "dit-faces", "flux-shapes", "dit-photos", "flux-photos")
# evaluation samples per model: those of bench/quality.py's runs (quality_meta.json)
SAMPLES = {"flux-digits": 10, "wan-digits": 10, "dit-faces": 10, "flux-shapes": 16, "dit-photos": 12,
           "flux-photos": 16}


def pass_counts(T):
    lv = [2.0, 2.5, 20 / 7] + ([3.0, 4.0] if T >= 50 else [])
    return sorted({math.floor(T / s + 1e-9) for s in lv}, reverse=True)


def bench(name, T, log):
    model = zoo.load(name)
    seeds, labels = eval_set(name, quick=False, samples=SAMPLES[name])
    ref = model.sample(seeds, labels, steps=T)
    cal = shipped(name, T)
    rows = []
    for K in pass_counts(T):
        scheds = {"spaced rule": schedules.spaced(T, K, 2)}
        if cal is not None and K in cal.schedules:
            scheds = {"calibrated": cal.schedules[K], **scheds}
        for sname, sched in scheds.items():
            for pred in PREDICTORS:
                cfg = TCPadeConfig(predictor=pred, schedule=tuple(sched), schedule_steps=T)
                img, summ = model.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
                b = next(iter(summ.branches))
                assert summ.computed(b) == list(sched), (summ.computed(b), sched)
                picks = [c for br in summ.branches for _, c in summ.choices(br)]
                rows.append(dict(model=name, steps=T, K=K, schedule_kind=sname, schedule=" ".join(map(str, sched)),
                                 predictor=pred, psnr=float(metrics.psnr(img, ref).mean()),
                                 ssim=float(metrics.ssim(img, ref).mean()),
                                 linear_share=(sum(c == "linear" for c in picks) / len(picks)) if picks else math.nan))  # fmt: skip
                log(f"  {name} T={T} K={K} {sname:11s} {pred:8s} {rows[-1]['psnr']:6.2f}")
    return rows


def report(rows, meta, path):
    lines = ["# The online predictor choice against each fixed predictor, same schedules", "",
             f"Machine: {meta['machine']}, {meta['threads']} torch thread(s); torch {meta['torch']}; {meta['date']}. "
             f"Command: `{meta['command']}`.", "",
             "PSNR (dB) against full computation of the same evaluation inputs (bench/quality.py's set: "
             + ", ".join(f"{m} {n}" for m, n in SAMPLES.items()) + " samples). Each row: one schedule (the "
             "model's calibrated one, searched with the rational predictor on other inputs, or the spaced rule) "
             "run with every predictor; `paper` is the published predictor alone on that schedule (no stored "
             "predictions). auto = after each computed step, the candidate among rational, linear, linear damped "
             "toward R1 (five strengths) and reuse whose errors on the computed steps so far, summed over the CFG "
             "branches, are the smallest (share of plain-linear choices shown). Goal: auto within 0.5 dB of the "
             "best fixed predictor.", ""]  # fmt: skip
    verdicts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for T in sorted({r["steps"] for r in rows if r["model"] == name}):
            rs = [r for r in rows if r["model"] == name and r["steps"] == T]
            lines += [f"## {name}, {T} steps", "",
                      "| passes (speedup) | schedule | " + " | ".join(PREDICTORS) + " | best fixed | auto - best | "
                      "linear chosen |", "|---" * (len(PREDICTORS) + 5) + "|"]  # fmt: skip
            for K in sorted({r["K"] for r in rs}, reverse=True):
                for kind in dict.fromkeys(r["schedule_kind"] for r in rs if r["K"] == K):
                    get = {r["predictor"]: r for r in rs if r["K"] == K and r["schedule_kind"] == kind}
                    best = max(FIXED, key=lambda p: get[p]["psnr"])
                    d = get["auto"]["psnr"] - get[best]["psnr"]
                    verdicts.append((name, T, K, kind, d, best))
                    share = get["auto"]["linear_share"]
                    lines.append(f"| {K} (x{T / K:.2f}) | {kind} | "
                                 + " | ".join(f"{get[p]['psnr']:.2f}" for p in PREDICTORS)
                                 + f" | {best} | {d:+.2f} {'met' if d >= -0.5 else 'MISS'} | "
                                 f"{'-' if math.isnan(share) else f'{100 * share:.0f} %'} |")  # fmt: skip
            lines.append("")
    miss = [v for v in verdicts if v[4] < -0.5]
    lines += ["## Verdict", "",
              f"auto within 0.5 dB of the best fixed predictor on {len(verdicts) - len(miss)} of {len(verdicts)} "
              "schedules. Misses:" + ("" if miss else " none."), ""]  # fmt: skip
    lines += [f"- {n}, {T} steps, {K} passes, {kind}: {d:+.2f} dB against {best}" for n, T, K, kind, d, best in miss]
    wins = {}
    for *_, best in verdicts:
        wins[best] = wins.get(best, 0) + 1
    lines += ["", "Best fixed predictor per schedule: " + ", ".join(f"{p} {n}" for p, n in sorted(wins.items())) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", default="20,50")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=OUT)
    p.add_argument("--report-only", action="store_true", help="re-render predictors.md from predictors.csv")
    p.add_argument("--append", action="store_true", help="keep the rows of predictors.csv for other models / T")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = dict(machine=cpu_name(), threads=args.threads, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python bench/predictors.py " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip
    path = os.path.join(args.out, "predictors.csv")
    rows = []
    if args.report_only or args.append:
        with open(path) as f:
            rows = [dict(r, steps=int(r["steps"]), K=int(r["K"]), psnr=float(r["psnr"]), ssim=float(r["ssim"]),
                         linear_share=float(r["linear_share"])) for r in csv.DictReader(f)]  # fmt: skip
    if not args.report_only:
        todo = [(n, int(t)) for t in args.steps.split(",") for n in args.models.split(",")]
        rows = [r for r in rows if (r["model"], r["steps"]) not in todo]
        for name, T in todo:
            rows += bench(name, T, lambda m: print(m, flush=True))
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    report(rows, meta, os.path.join(args.out, "predictors.md"))
    print(f"wrote {os.path.join(args.out, 'predictors.md')}", flush=True)


if __name__ == "__main__":
    main()
