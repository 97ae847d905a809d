"""Placement evenly spaced on the scheduler's time axis instead of the step index (measurement only).
Run (repository root): PYTHONPATH=bench nice -n 10 .venv/bin/python bench/research/time_spaced/run.py \
    MODELS STEPS LEVELS ALPHAS PREDICTORS OUT.csv
At level L, K = passes_at(T, L): step 0, then K - 1 steps at evenly spaced values of
u_k = (1 - a) k / (T - 1) + a (t_0 - t_k) / (t_0 - t_{T-1}) (t: the scheduler's timesteps), from the
spaced rule's first gap to its last computed step, each taken at the nearest free step. a = 0 is the
spaced rule's placement; a = 1 evenly spaced in the model's time. The library runs the schedule
(TCPadeConfig(predictor=P, schedule=..., schedule_steps=T)); PSNR against full computation."""
import csv, os, sys, time

import torch

torch.set_num_threads(1)
from _bench_common import zoo_times  # noqa: E402
from quality import eval_set  # noqa: E402
from defaults import passes_at, best_peers  # noqa: E402
from tcpade import zoo  # noqa: E402
from tcpade.tools import metrics  # noqa: E402
from tcpade.policy.config import TCPadeConfig  # noqa: E402
from tcpade.policy.schedules import spaced  # noqa: E402

LV = {"2": 2.0, "2.5": 2.5, "2.9": 20 / 7, "3": 3.0, "4": 4.0}


def time_spaced(times, K, a):
    T = len(times)
    base = spaced(T, K)
    if a == 0:
        return base
    t0, tl = float(times[0]), float(times[-1])
    u = [(1 - a) * k / (T - 1) + a * (t0 - float(times[k])) / (t0 - tl) for k in range(T)]
    lo, hi = u[base[1]] if len(base) > 1 else u[1], u[base[-1]]
    # targets: K - 1 values from the first to the last computed step of the spaced rule, evenly in u;
    # the first at the spaced rule's u-gap measured from step 0
    r = K - 1
    gap = (hi - u[0]) / r
    targets = [u[0] + gap * (i + 1) for i in range(r)]
    out = [0]
    for tg in targets:
        k = min(range(1, T), key=lambda j: abs(u[j] - tg))
        while k in out and k < T - 1:
            k += 1
        while k in out:
            k -= 1
        out.append(k)
    out = sorted(set(out))
    while len(out) < K:  # collisions: fill the largest gap
        gaps = [(b - a_, a_) for a_, b in zip(out, out[1:] + [T])]
        g, s = max(gaps)
        out = sorted(set(out + [s + g // 2]))
    return tuple(out[:K])


if __name__ == "__main__":
    models, Ts, lvls = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], sys.argv[3].split(",")
    alphas, preds, path = [float(x) for x in sys.argv[4].split(",")], sys.argv[5].split(","), sys.argv[6]
    peers = best_peers(models)
    new = not os.path.exists(path)
    f = open(path, "a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["model", "steps", "level", "passes", "alpha", "predictor", "schedule", "psnr", "peer", "margin", "wall_s"])
    for name in models:
        mdl = zoo.load(name)
        s, l = eval_set(name, False, 16)
        for T in Ts:
            ref = mdl.sample(s, l, steps=T)
            times = zoo_times(mdl, T)
            for lv in lvls:
                level = LV[lv]
                K = passes_at(T, level)
                peer = peers.get((name, T, round(level, 4)), (float("nan"), ""))[0]
                seen = {}
                for a in alphas:
                    sched = time_spaced(times, K, a)
                    for p in preds:
                        t0 = time.time()
                        if (sched, p) not in seen:  # the same schedule at another alpha: the same run
                            cfg = TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T)
                            seen[(sched, p)] = float(metrics.psnr(mdl.sample(s, l, steps=T, config=cfg), ref).mean())
                        q = seen[(sched, p)]
                        w.writerow([name, T, round(level, 4), K, a, p, " ".join(map(str, sched)), round(q, 4), peer,
                                    round(q - peer, 3), round(time.time() - t0, 1)])
                        f.flush()
                        print(name, T, lv, K, a, p, " ".join(map(str, sched)), f"{q:.2f}", f"margin {q - peer:+.2f}", flush=True)
