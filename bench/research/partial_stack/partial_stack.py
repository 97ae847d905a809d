"""Partial-stack skipping and ridge polynomial predictors against the library's whole-stack predictors
at equal block compute (bench/research/partial_stack/README.md).

    PYTHONPATH=bench:bench/research/partial_stack nice -n 19 .venv/bin/python \
        bench/research/partial_stack/partial_stack.py --models flux-photos --steps 10,20,50

Per model, step count T and compute level L (speedup in block-Linear MACs, bench/peers.py's count_macs,
against full computation of the same inputs; a run qualifies when its speedup >= L * 0.999, the rule
the peers are read with):

* whole: the library itself (``TCPadeConfig(predictor=..., schedule=spaced(T, K))``: rational, linear,
  reuse, auto) with K the most passes that reach L;
* damped (``--kinds damped``): the library's linear and rational with ``TCPadeConfig.damping``, same schedule;
* partial: the emulation (emulate.py) with the first n_f and last n_b blocks run on every skipped step
  and the middle residual predicted by the library's rational / linear / reuse coefficients, on
  spaced(T, K') with K' the most passes that still reach L at the partial steps' real cost;
* samek (``--kinds samek``): the partial-stack emulation on the whole-stack schedule spaced(T, K) (the
  same passes, more compute: what the partial steps buy in quality before their cost is paid);
* fit: the ridge polynomial predictors (emulate.py) on the whole stack, on spaced(T, K).

PSNR (tcpade.tools.metrics.psnr, data range 2) against full computation of bench/quality.py's
evaluation inputs (eval_set(name, False, 16)). Rows are appended to --out as they finish.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch
from emulate import Emulator, block_macs
from peers import count_macs
from quality import eval_set

from tcpade import zoo
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.schedules import spaced
from tcpade.tools import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = (2.0, 2.5, 2.9)
PAIRS = ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2))
OURS = ("rational", "linear", "reuse")
FITS = (
    tuple(f"fit:index:a:{m}:{d}:{r}" for d in (1, 2) for m in (3, 4, 5) for r in (0, 0.3, 1, 3))
    + tuple(f"fit:index:f:{m}:{d}:0" for d in (1, 2) for m in (4, 5))
    + tuple(f"fit:sigma:a:3:1:{r}" for r in (0, 0.3, 1))
)
DAMPED = ("linear:d0.5", "linear:d1", "linear:d2", "linear:d4", "rational:d1", "rational:d2")
FIELDS = ["model", "steps", "level", "kind", "method", "n_f", "n_b", "passes", "schedule", "share", "speedup",
          "psnr", "wall_s"]  # fmt: skip


def most_passes(T: int, level: float, cost: float) -> int:
    """The most computed steps K >= 2 whose block share (K + (T - K) cost) / T reaches ``level``
    (speedup >= level * 0.999); 0 when none does."""
    best = 0
    for k in range(2, T + 1):
        if T / (k + (T - k) * cost) >= level * 0.999:
            best = k
    return best


def record(ctx, level, kind, method, n_f, n_b, sched):
    """One run (``lib:<predictor>``: the library; else the emulation ``ctx["emu"]``), its row written
    and printed."""
    model, seeds, labels, T = ctx["model"], ctx["seeds"], ctx["labels"], ctx["steps"]
    t1 = time.time()
    with count_macs(model.transformer) as c:
        if method.startswith("lib:"):  # lib:<predictor>[:d<damping>]
            pred, _, damp = method[4:].partition(":d")
            cfg = TCPadeConfig(predictor=pred, schedule=sched, schedule_steps=T, damping=float(damp or 0))
            img = model.sample(seeds, labels, steps=T, config=cfg)
        else:
            img = ctx["emu"].run(seeds, labels, T, sched, n_f, n_b, method)
    share = c.macs / ctx["full"]
    row = dict(model=ctx["name"], steps=T, level=level, kind=kind, method=method, n_f=n_f, n_b=n_b,
               passes=len(sched), schedule=" ".join(map(str, sched)), share=round(share, 4),
               speedup=round(1 / share, 4), psnr=round(float(metrics.psnr(img, ctx["ref"]).mean()), 3),
               wall_s=round(time.time() - t1, 1))  # fmt: skip
    ctx["writer"].writerow(row)
    ctx["file"].flush()
    print(f"  {ctx['name']} T={T} L={level} {kind:7s} {method:22s} f{n_f} b{n_b} K={len(sched):2d} "
          f"x{row['speedup']:.3f} {row['psnr']:7.3f} ({row['wall_s']}s)", flush=True)  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flux-photos,flux-shapes,dit-photos")
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--kinds", default="whole,damped,partial,fit")
    ap.add_argument("--out", default=os.path.join(HERE, "partial_stack.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kinds = args.kinds.split(",")
    exists = os.path.exists(args.out)
    f = open(args.out, "a", newline="")
    w = csv.DictWriter(f, fieldnames=FIELDS)
    if not exists:
        w.writeheader()
    for name in args.models.split(","):
        model = zoo.load(name)
        seeds, labels = eval_set(name, False, 16)
        for T in map(int, args.steps.split(",")):
            t0 = time.time()
            macs = block_macs(model, seeds, labels, T)
            with count_macs(model.transformer) as cnt:
                ref = model.sample(seeds, labels, steps=T)
            full = cnt.macs
            assert full == sum(macs), (full, sum(macs))
            print(f"{name} T={T}: full {time.time() - t0:.1f}s, block MACs shares "
                  f"{' '.join(f'{m / full:.3f}' for m in macs)}", flush=True)  # fmt: skip
            ctx = dict(name=name, model=model, seeds=seeds, labels=labels, steps=T, ref=ref, full=full, writer=w,
                       file=f)  # fmt: skip
            for level in map(float, args.levels.split(",")):
                sched = spaced(T, most_passes(T, level, 0.0))
                if "whole" in kinds:  # the library's own hooks (no emulator attached)
                    for v in OURS + ("auto",):
                        record(ctx, level, "whole", f"lib:{v}", 0, 0, sched)
                if "damped" in kinds:  # the library's damping toward R1 (TCPadeConfig.damping)
                    for v in DAMPED:
                        record(ctx, level, "damped", f"lib:{v}", 0, 0, sched)
                ctx["emu"] = Emulator(model)
                try:
                    if "partial" in kinds:
                        for n_f, n_b in PAIRS:
                            if n_f + n_b >= len(macs):
                                continue
                            cost = (sum(macs[:n_f]) + sum(macs[len(macs) - n_b :])) / full
                            kp = most_passes(T, level, cost)
                            if kp == 0:
                                print(f"  {name} T={T} L={level} partial f{n_f} b{n_b}: no schedule reaches the level "
                                      f"(cost of a partial step {cost:.3f})", flush=True)  # fmt: skip
                                continue
                            for v in OURS:
                                record(ctx, level, "partial", f"ours:{v}", n_f, n_b, spaced(T, kp))
                    if "samek" in kinds:  # partial steps on the whole-stack schedule: more compute, same passes
                        for n_f, n_b in PAIRS[:3]:
                            for v in OURS:
                                record(ctx, level, "samek", f"ours:{v}", n_f, n_b, sched)
                    if "fit" in kinds:
                        for p in FITS:
                            record(ctx, level, "fit", p, 0, 0, sched)
                finally:
                    ctx["emu"].close()
    f.close()


if __name__ == "__main__":
    main()
