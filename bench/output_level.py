"""Output level against block level: which one predicts a skipped call better, per zoo model.

    python bench/output_level.py                      # every zoo model, 20 and 50 steps
    python bench/output_level.py --models flux-digits --steps 20 --samples 4

``TCPadeConfig.level="block"`` (the default) predicts the residual of the block stack and runs
the embeddings and the output norm / projection on every call; ``level="output"`` extrapolates
what the transformer returns (as diffusers' TaylorSeer "lite" mode does) and runs nothing on a
skipped call. Both run here on the same computed steps: the model's calibrated schedule at the
pass counts of 2x, 2.5x and 2.9x (and 4x at 50 steps), with the rational, linear and auto
predictors. PSNR against full computation of bench/quality.py's evaluation inputs (none of them
a calibration input). Writes bench/results/output_level.md and output_level.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name
from quality import eval_set

from tcpade import metrics, zoo
from tcpade.tools.calibrate import shipped
from tcpade.policy.config import TCPadeConfig

OUT = os.path.join(ROOT, "bench", "results")
MODELS = ("flux-digits", "wan-digits", "dit-faces", "flux-shapes", "dit-photos", "flux-photos")
PASSES = {20: (10, 8, 7), 50: (25, 20, 17, 12)}  # 2x, 2.5x (slow), 2.9x (fast); 4x at 50
PREDICTORS = ("rational", "linear", "auto")
LEVELS = ("block", "output")


def run(name, T, samples, log):
    m = zoo.load(name)
    seeds, labels = eval_set(name, False, samples)
    ref = m.sample(seeds, labels, steps=T)
    cal = shipped(name, T)
    rows = []
    for k in PASSES[T]:
        sched = cal.schedules[k]
        for level in LEVELS:
            for pred in PREDICTORS:
                cfg = TCPadeConfig(schedule=sched, schedule_steps=T, predictor=pred, level=level)
                psnr = float(metrics.psnr(m.sample(seeds, labels, steps=T, config=cfg), ref).mean())
                rows.append(dict(model=name, steps=T, passes=k, level=level, predictor=pred, psnr=psnr))
        log(f"{name} T={T} K={k}: " + " ".join(f"{r['level'][0]}{r['predictor'][:3]}={r['psnr']:.2f}"
                                                 for r in rows if r["passes"] == k))  # fmt: skip
    return rows


def report(rows, meta, path):
    lines = ["# Output level against block level", "",
             f"Machine: {meta['machine']}, 1 torch thread; torch {meta['torch']}; {meta['date']}. "
             f"Command: `{meta['command']}`.", "",
             "PSNR (dB) against full computation of the same inputs (bench/quality.py's evaluation set), on the "
             "model's calibrated schedule at each pass count: the same computed steps in every column. "
             "`block` predicts the block stack's residual (tcpade's default), `output` the transformer's "
             "output (`TCPadeConfig(level=\"output\")`). The last column: the best output-level predictor "
             "minus the best block-level one. The schedules were calibrated for block level with the rational "
             "predictor (tcpade/zoo/schedules.json), which favours the block columns; a schedule searched for "
             "output level was not tried.", "",
             "| model | T | passes | block rational | block linear | block auto | output rational | output linear | "
             "output auto | best output - best block |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["model"], r["steps"], r["passes"]) for r in rows},
                  key=lambda x: (MODELS.index(x[0]) if x[0] in MODELS else 99, x[1], -x[2]))  # fmt: skip
    wins = []
    for name, T, k in keys:
        v = {(r["level"], r["predictor"]): r["psnr"] for r in rows
             if (r["model"], r["steps"], r["passes"]) == (name, T, k)}  # fmt: skip
        cells = [f"{v[(lv, p)]:.2f}" for lv in LEVELS for p in PREDICTORS]
        d = max(v[("output", p)] for p in PREDICTORS) - max(v[("block", p)] for p in PREDICTORS)
        wins.append((name, T, k, d))
        lines.append(f"| {name} | {T} | {k} | " + " | ".join(cells) + f" | {d:+.2f} |")
    n_won = sum(d > 0 for *_, d in wins)
    lines += ["", "## Where output level wins", "",
              f"Ahead of block level at {n_won} of {len(wins)} points, by at most "
              f"{max(d for *_, d in wins):+.2f} dB; behind by up to {min(d for *_, d in wins):+.2f} dB.", ""]
    for name in dict.fromkeys(n for n, *_ in wins):
        ds = [(T, k, d) for n, T, k, d in wins if n == name]
        won = [f"{T}/{k}" for T, k, d in ds if d > 0]
        lines.append(f"- {name}: ahead at {len(won)} of {len(ds)} points ({', '.join(won) or 'none'}); "
                     f"from {min(d for *_, d in ds):+.2f} to {max(d for *_, d in ds):+.2f} dB")  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", default="20,50")
    p.add_argument("--samples", type=int, default=16, help="evaluation samples per model (bench/quality.py's first N)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--append", action="store_true", help="keep the rows of output_level.csv for other models / T")
    p.add_argument("--report-only", action="store_true", help="re-render output_level.md from output_level.csv")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    meta = dict(machine=cpu_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python bench/output_level.py " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip
    csv_path = os.path.join(args.out, "output_level.csv")
    rows = []
    if args.append or args.report_only:
        with open(csv_path) as f:
            rows = [dict(r, steps=int(r["steps"]), passes=int(r["passes"]), psnr=float(r["psnr"]))
                    for r in csv.DictReader(f)]  # fmt: skip
    if not args.report_only:
        todo = [(n, int(t)) for t in args.steps.split(",") for n in args.models.split(",")]
        rows = [r for r in rows if (r["model"], r["steps"]) not in todo]
        for name, T in todo:
            rows += run(name, T, args.samples, lambda s: print(s, flush=True))
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    report(rows, meta, os.path.join(args.out, "output_level.md"))
    print(f"wrote {os.path.join(args.out, 'output_level.md')}", flush=True)


if __name__ == "__main__":
    main()
