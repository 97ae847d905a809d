"""Placement x extrapolation target at the benchmark's speedup levels (a measurement, not in the library).

Placements (P passes of T): "w2e1" the spaced rule as shipped (steps 0, 1, then evenly spaced, the
last computed step 1 before the end); "w1e1" / "w1e2": step 0 only, then evenly spaced (the first
skip reuses the one residual); "w1back": step 0, then spaced backward from step T-2 with the gap
ceil((T-2)/(P-1)) (diffusers TaylorSeer's own placement at 10 steps: 0 2 5 8).
Targets: "res" (``TCPadeConfig(extrapolate="residual")``: the residual h_out - h_in, plus the call's
h_in) and "out" (``extrapolate="h_out"``: the stack's h_out extrapolated itself; the CSVs here were
measured before that field existed, with the same computation patched in: see probe.py).
Run: PYTHONPATH=bench python bench/research/stack_output/placement.py MODELS STEPS OUT.csv"""
import csv, math, os, sys, torch
torch.set_num_threads(1)
from quality import eval_set
from peers import levels
from defaults import passes_at
from tcpade import zoo, metrics
from tcpade.policy.config import TCPadeConfig
from tcpade.policy import schedules as S

TARGET = {"res": "residual", "out": "h_out"}


def back(T, P, end=1):
    last = T - 1 - end
    g = math.ceil(last / (P - 1))
    pos = [last - g * i for i in range(P - 1)][::-1]
    out = [0]
    for i, x in enumerate(pos):
        out.append(max(x, out[-1] + 1))
    return tuple(out)


def regular(T, P, end=1):
    """The smallest integer gap whose points counted back from step T-1-end (with step 0) fit in P
    passes; the passes left over go to the first steps (a warm-up)."""
    last = T - 1 - end
    for g in range(1, T):
        pts = set(range(last, 0, -g)) | {0}
        if len(pts) <= P:
            break
    w = 1
    while len(pts) < P and w < T:
        pts.add(w)
        w += 1
    return tuple(sorted(pts))


PLACE = {"reg": regular,
"w2e1": lambda T, P: S.spaced(T, P, 2, end=1, warmup=2),
         "w1e1": lambda T, P: S.spaced(T, P, 1, end=1, warmup=1),
         "w1e2": lambda T, P: S.spaced(T, P, 1, end=2, warmup=1),
         "w1back": lambda T, P: back(T, P)}
RULES = [("auto", "res"), ("auto", "out"), ("linear", "out")]
if os.environ.get("RULES"):  # e.g. RULES=linear/res,rational/out PLACE=w1e1
    RULES = [tuple(r.split("/")) for r in os.environ["RULES"].split(",")]
if os.environ.get("PLACE"):
    PLACE = {k: PLACE[k] for k in os.environ["PLACE"].split(",")}

models, Ts, path = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], sys.argv[3]
new = not os.path.exists(path)
f = open(path, "a", newline="")
w = csv.writer(f)
if new:
    w.writerow(["model", "steps", "level", "tag", "passes", "placement", "predictor", "target", "schedule", "psnr"])
for name in models:
    m = zoo.load(name)
    s, l = eval_set(name, False, 16)
    for T in Ts:
        ref = m.sample(s, l, steps=T)
        for level, tag in levels(T):
            P = passes_at(T, level)
            done = {}
            for pl, fn in PLACE.items():
                sched = fn(T, P)
                for p, tgt in RULES:
                    key = (sched, p, tgt)
                    if key not in done:
                        cfg = TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T, extrapolate=TARGET[tgt])
                        o = m.sample(s, l, steps=T, config=cfg)
                        done[key] = float(metrics.psnr(o, ref).mean())
                    w.writerow([name, T, round(level, 4), tag, P, pl, p, tgt, " ".join(map(str, sched)), round(done[key], 4)])
            f.flush()
            print(name, T, tag, P, flush=True)
