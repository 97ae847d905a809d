"""Candidates on spaced(T, K) at the benchmark's levels; PSNR against full computation.
Run (repository root): PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x nice -n 10 .venv/bin/python bench/research/predictor_2p5x/run.py \
    MODELS STEPS LEVELS CANDIDATES OUT.csv [--lib]
LEVELS: 2,2.5,2.9 (2.9 = the benchmark's 20/7); --lib also runs the library's own linear
(TCPadeConfig(predictor="linear", schedule=spaced(T, K), schedule_steps=T)) as "lib_linear".
Diagnostic candidates (more compute than the level): "x12|<cand>": steps 1 and 2 computed exactly
but not stored; "xlate|<cand>": every skipped step after step 3 computed exactly, not stored."""
import csv, os, sys, time
import torch

torch.set_num_threads(1)
from quality import eval_set  # noqa: E402
from defaults import passes_at  # noqa: E402
from tcpade import zoo  # noqa: E402
from tcpade.tools import metrics  # noqa: E402
from tcpade.policy.config import TCPadeConfig  # noqa: E402
from tcpade.policy.schedules import spaced  # noqa: E402
from emu import Emulator  # noqa: E402
import preds as P  # noqa: E402

LV = {"2": 2.0, "2.5": 2.5, "2.9": 20 / 7}
models, Ts, lvls, cands, path = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], \
    sys.argv[3].split(","), sys.argv[4].split(","), sys.argv[5]
lib = "--lib" in sys.argv
new = not os.path.exists(path)
f = open(path, "a", newline="")
w = csv.writer(f)
if new:
    w.writerow(["model", "steps", "level", "passes", "schedule", "cand", "psnr", "wall_s"])
for name in models:
    m = zoo.load(name)
    s, l = eval_set(name, False, 16)
    for T in Ts:
        t0 = time.time()
        ref = m.sample(s, l, steps=T)
        print(name, T, "full", f"{time.time() - t0:.1f}s", flush=True)
        for lv in lvls:
            level = LV[lv]
            K = passes_at(T, level)
            sched = spaced(T, K)
            if lib:
                t0 = time.time()
                o = m.sample(s, l, steps=T, config=TCPadeConfig(predictor="linear", schedule=sched, schedule_steps=T))
                p = float(metrics.psnr(o, ref).mean())
                w.writerow([name, T, round(level, 4), K, " ".join(map(str, sched)), "lib_linear", round(p, 4), round(time.time() - t0, 1)])
                print(name, T, lv, "lib_linear", f"{p:.3f}", flush=True)
            emu = Emulator(m)
            try:
                for c in cands:
                    t0 = time.time()
                    ex, cc = (), c
                    if c.startswith("x12|"):  # diagnostic: steps 1, 2 (reuse of R0) exact, not stored
                        ex, cc = (1, 2), c[4:]
                    elif c.startswith("xlate|"):  # diagnostic: every skip after step 3 exact, not stored
                        ex, cc = tuple(k for k in range(4, T) if k not in sched), c[6:]
                    o = emu.run(s, l, T, sched, P.make(cc, T), exact=ex)
                    p = float(metrics.psnr(o, ref).mean())
                    w.writerow([name, T, round(level, 4), K, " ".join(map(str, sched)), c, round(p, 4), round(time.time() - t0, 1)])
                    f.flush()
                    print(name, T, lv, K, c, f"{p:.3f}", f"{time.time() - t0:.1f}s", flush=True)
            finally:
                emu.close()
