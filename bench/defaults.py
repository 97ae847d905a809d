"""The default rule for a model nobody calibrated, chosen leave-one-model-out.

    python bench/defaults.py                         # every zoo model, 10, 20, 28 and 50 steps (~30 min)
    python bench/defaults.py --models flux-digits --steps 10,20
    python bench/defaults.py --report-only           # re-render defaults.md from defaults.csv

A user who brings a model tcpade never saw gets a default rule: a placement of the computed steps
(the spaced rule: steps 0 .. lead-1, then evenly spaced from step 0, the last one a step before the
end of the run) and a predictor. This bench runs every candidate rule (predictor x lead) on every zoo
model at the pass counts of the benchmark's speedup levels (bench/peers.py ``levels``: 2x, 2.5x,
2.9x; at 50 steps also 3x and 4x), with no calibration, on bench/quality.py's evaluation inputs
(PSNR against full computation of the same seeds), and compares each with the best peer at that
compute (every peer method and knob setting in bench/results/quality_<model>.csv: the same inputs,
the same loop).

Leave-one-model-out: for each model, the rule with the best mean margin over the best peer on the
*other* five models is the default; its margin on the held-out model is what a user of a new
model can expect. Writes bench/results/defaults.csv and defaults.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name, zoo_times
from peers import levels
from quality import eval_set

from tcpade import metrics, zoo
from tcpade.core.layout import MIN_HISTORY
from tcpade.policy import schedules as S
from tcpade.policy.config import TCPadeConfig

OUT = os.path.join(ROOT, "bench", "results")
CSV = os.path.join(OUT, "defaults.csv")
MODELS = ("flux-digits", "dit-faces", "wan-digits", "flux-shapes", "dit-photos", "flux-photos")
STEPS = (10, 20, 28, 50)
# predictor label -> TCPadeConfig fields ("rational/schedule": the predictor and axis of the earlier releases;
# "linear h_out": linear extrapolation of the block stack's output instead of its residual)
PREDICTORS = {
    "linear": dict(predictor="linear"),
    "linear h_out": dict(predictor="linear", extrapolate="h_out"),
    "auto": dict(predictor="auto"),
    "rational/schedule": dict(predictor="rational", time_axis="schedule"),
}
# rule name -> (predictor label, lead, time weight): the spaced rule computes steps 0 .. lead-1 first (lead 1:
# the first skips reuse the one residual; lead 2: the rule of the earlier releases), the rest evenly spaced on
# the step index (time weight 0) or on a blend of it and the scheduler's time (schedules.spaced's time_weight:
# TCPadeConfig.time_spacing). The last computed step is always one before the end (schedules.SPACED_END; end 0
# and end 2 measured worse: bench/research/stack_output/).
RULES = {
    "linear, lead 1": ("linear", 1, 0.0),
    "linear h_out, lead 1": ("linear h_out", 1, 0.0),
    "auto, lead 1": ("auto", 1, 0.0),
    "auto, lead 2": ("auto", 2, 0.0),
    "rational/schedule, lead 2": ("rational/schedule", 2, 0.0),
    "linear, lead 1, time 0.25": ("linear", 1, 0.25),
    "linear, lead 1, time 0.375": ("linear", 1, 0.375),
    "linear, lead 1, time 0.5": ("linear", 1, 0.5),
}
GOAL_DB = 2.0


def passes_at(steps: int, level: float) -> int:
    """The most passes whose MAC speedup reaches ``level`` (bench/quality.py's 1e-3 slack)."""
    return max(3, math.floor(steps / (level * (1 - 1e-3))))


def best_peers(models, folder: str = OUT) -> dict:
    """(model, steps, level) -> (psnr, label) of the best peer reaching that speedup (the
    quality_<model>.csv files in ``folder``)."""
    out = {}
    for name in models:
        path = os.path.join(folder, f"quality_{name}.csv")
        with open(path) as f:
            for r in csv.DictReader(f):
                if r["group"].startswith("tcpade") or r["group"] == "full":
                    continue
                t = int(r["steps"])
                for level, _ in levels(t):
                    if float(r["speedup"]) >= level * (1 - 1e-3):
                        k = (name, t, round(level, 4))
                        if k not in out or float(r["psnr"]) > out[k][0]:
                            out[k] = (float(r["psnr"]), r["label"])
    return out


def run(models, steps_list, log, only=None) -> list:
    rules = {k: v for k, v in RULES.items() if only is None or re.search(only, k)}
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = zoo.load(name)
        seeds, labels = eval_set(name, False, 16)
        for steps in steps_list:
            t0 = time.perf_counter()
            ref = model.sample(seeds, labels, steps=steps)
            times = zoo_times(model, steps)  # what tcpade.sample's runtime places the rule on
            for level, tag in levels(steps):
                k = passes_at(steps, level)
                for rule, (pred, lead, weight) in rules.items():
                    fields = PREDICTORS[pred]
                    sched = S.spaced(steps, k, max(lead, MIN_HISTORY[fields["predictor"]]), end=1, times=times,
                                     time_weight=weight)  # fmt: skip
                    cfg = TCPadeConfig(schedule=sched, schedule_steps=steps, **fields)
                    out = model.sample(seeds, labels, steps=steps, config=cfg)
                    psnr = float(metrics.psnr(out, ref).mean())
                    rows.append(dict(model=name, steps=steps, level=round(level, 4), tag=tag, passes=k, rule=rule,
                                     schedule=" ".join(map(str, sched)), psnr=round(psnr, 4)))  # fmt: skip
                here = [r for r in rows if (r["model"], r["steps"], r["tag"]) == (name, steps, tag)]
                log(f"{name} T={steps} {tag} ({k} passes): " + " ".join(f"{r['rule']}={r['psnr']:.2f}" for r in here))
            log(f"{name} T={steps}: {time.perf_counter() - t0:.0f} s")
    return rows


def analyse(rows, peers) -> list:
    """The markdown lines of the report."""
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    rules = [r for r in RULES if any(x["rule"] == r for x in rows)]
    margin = {}
    for r in rows:
        p = peers.get((r["model"], int(r["steps"]), float(r["level"])))
        if p is not None:
            margin[(r["model"], int(r["steps"]), r["tag"], r["rule"])] = float(r["psnr"]) - p[0]
    points = sorted({(m, s, t) for m, s, t, _ in margin}, key=lambda x: (models.index(x[0]), x[1], levels_order(x)))

    def mean(rule, keep):
        v = [margin[(m, s, t, rule)] for m, s, t in points if keep(m) and (m, s, t, rule) in margin]
        return sum(v) / len(v) if v else -math.inf

    lines = ["## Every rule on every model (mean margin over the best peer, dB)", "",
             "| rule | " + " | ".join(models) + " | all |", "|---|" + "---|" * (len(models) + 1)]  # fmt: skip
    for rule in rules:
        cells = [f"{mean(rule, lambda m, x=x: m == x):+.2f}" for x in models]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {mean(rule, lambda m: True):+.2f} |")
    best_all = max(rules, key=lambda r: mean(r, lambda m: True))
    lines += ["", f"Best over all six models: **{best_all}**.", "",
              "## Leave one model out", "",
              "For each model, the rule with the best mean margin on the other five, and its margin on the "
              f"model left out, per step count and level (goal: >= {GOAL_DB:g} dB; **bold: a miss**).", "",
              "| held out | rule chosen on the others | steps | " + " | ".join(t for _, t in levels(50)) + " | mean |",
              "|---|---|---|" + "---|" * (len(levels(50)) + 1)]  # fmt: skip
    misses = total = 0
    for held in models:
        rule = max(rules, key=lambda r, h=held: mean(r, lambda m: m != h))
        vals = []
        for s in sorted({s for m, s, _ in points if m == held}):
            cells = []
            for _, tag in levels(50):
                v = margin.get((held, s, tag, rule))
                if v is None:
                    cells.append("")
                    continue
                vals.append(v)
                total += 1
                miss = v < GOAL_DB
                misses += miss
                cells.append(f"**{v:+.2f}**" if miss else f"{v:+.2f}")
            lines.append(f"| {held} | {rule} | {s} | " + " | ".join(cells) + " |  |")
        mean_held = sum(vals) / len(vals)
        lines.append(f"| {held} | {rule} | all | " + " | " * (len(levels(50)) - 1) + f" | {mean_held:+.2f} |")
    lines += ["", f"Goal met at {total - misses} of {total} held-out points; {misses} misses.", ""]
    lines += ["## The best peer at each point", "", "| model | steps | level | best peer (PSNR, method) |",
              "|---|---|---|---|"]
    for m, s, t in points:
        lv = next(lv for lv, tag in levels(s) if tag == t)
        p = peers[(m, s, round(lv, 4))]
        lines.append(f"| {m} | {s} | {t} | {p[0]:.2f} ({p[1]}) |")
    return lines


def levels_order(point):
    return [t for _, t in levels(50)].index(point[2])


def write_report(rows, cmd):
    peers = best_peers(sorted({r["model"] for r in rows}))
    head = [
        "# The default rule for an uncalibrated model, chosen leave-one-model-out",
        "",
        f"Generated by `{cmd}` from defaults.csv (its rows: `python bench/defaults.py`, the rules without a time "
        "weight; `python bench/defaults.py --rules time`, the time-spaced ones, on every model). Machine: {cpu_name()} (2-core VM), 1 torch thread; torch "
        f"{torch.__version__}. PSNR in dB against full computation of the same seeds (bench/quality.py's evaluation "
        "inputs), no calibration: every rule is the spaced rule (steps 0 .. lead-1, then evenly spaced from step 0, "
        "the last computed step one before the end) with a predictor, at the pass counts of the speedup levels "
        "(2x, 2.5x, 2.9x = 20/7; at 50 steps also 3x and 4x; at least 3 passes). Margin: the rule's PSNR minus the "
        "best peer's reaching the same speedup (every peer and knob setting in quality_<model>.csv). Predictors: "
        "`linear` (on the step-index axis), `linear h_out` (the same, extrapolating the block stack's output instead "
        "of its residual: `TCPadeConfig(extrapolate=\"h_out\")`), `auto` (the online choice among rational, linear, "
        "damped linear and reuse), `rational/schedule` (rational on the scheduler's time axis: the predictor of the "
        "earlier releases). Lead 1 is the spaced rule of this release, lead 2 that of the earlier ones. `time a`: "
        "the computed steps evenly spaced on (1 - a) x the step index + a x the scheduler's time (both scaled to "
        "0 .. 1; `TCPadeConfig.time_spacing`), which moves steps toward the end of a shifted flow-matching schedule "
        "(flux-shapes, flux-photos, wan-digits: shift 3) and changes nothing where the time is even in the step "
        "index (dit-*: DDIM; flux-digits: shift 1); without it, evenly on the step index.",
        "",
    ]
    with open(os.path.join(OUT, "defaults.md"), "w") as f:
        f.write("\n".join(head + analyse(rows, peers)) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--rules", default=None, help="run only the rules whose name matches this regex (the other "
                    "rules' rows in defaults.csv stay)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cmd = "python bench/defaults.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        rows = run(args.models.split(","), [int(s) for s in args.steps.split(",")], lambda s: print(s, flush=True),
                   args.rules)  # fmt: skip
        keep = []
        if os.path.exists(CSV):  # rows of other models / step counts / rules stay
            with open(CSV) as f:
                done = {(r["model"], int(r["steps"]), r["rule"]) for r in rows}
                keep = [r for r in csv.DictReader(f) if (r["model"], int(r["steps"]), r["rule"]) not in done]
        rows = keep + rows
        with open(CSV, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    with open(CSV) as f:
        rows = list(csv.DictReader(f))
    write_report(rows, cmd.strip())
    print(f"wrote {os.path.join(OUT, 'defaults.md')}")


if __name__ == "__main__":
    main()
