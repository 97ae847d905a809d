"""CFG-split placements against the shipped spaced rule at the same block-stack passes.
Run (repository root): PYTHONPATH=bench:bench/research/partial_stack:bench/research/predictor_2p5x:bench/research/cfg_delta \
    nice -n 10 .venv/bin/python bench/research/cfg_delta/run.py MODELS STEPS LEVELS MS MODES OUT.csv
At level L with K = passes_at(T, L) passes per branch (2K branch calls): the cond branch computes
sc = spaced(T, K + m), the uncond branch su = K - m of them (the first two and then evenly by
position in sc); m = 0 with mode "own" is the library's spaced rule with linear."""
import csv, os, sys, time

import torch

torch.set_num_threads(1)
from quality import eval_set  # noqa: E402
from defaults import passes_at, best_peers  # noqa: E402
from tcpade import zoo  # noqa: E402
from tcpade.tools import metrics  # noqa: E402
from tcpade.policy.schedules import spaced  # noqa: E402
from cfgemu import CfgEmulator  # noqa: E402

LV = {"2": 2.0, "2.5": 2.5, "2.9": 20 / 7, "3": 3.0, "4": 4.0}


def subset(sc, n, lead=2):
    sc = sorted(sc)
    if n >= len(sc):
        return sc
    head = sc[:lead]
    rest = sc[lead:]
    n2 = n - lead
    if n2 <= 0:
        return sc[:n]
    idx = sorted({round(j * (len(rest) - 1) / max(1, n2 - 1)) for j in range(n2)}) if n2 > 1 else [0]
    return head + [rest[j] for j in idx]


if __name__ == "__main__":
    models, Ts, lvls = sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], sys.argv[3].split(",")
    ms, modes, path = [float(x) for x in sys.argv[4].split(",")], sys.argv[5].split(","), sys.argv[6]
    peers = best_peers(models)
    new = not os.path.exists(path)
    f = open(path, "a", newline="")
    w = csv.writer(f)
    if new:
        w.writerow(["model", "steps", "level", "passes", "m", "mode", "sc", "su", "calls", "psnr", "peer", "wall_s"])
    for name in models:
        mdl = zoo.load(name)
        s, l = eval_set(name, False, 16)
        for T in Ts:
            ref = mdl.sample(s, l, steps=T)
            em = CfgEmulator(mdl)
            try:
                for lv in lvls:
                    level = LV[lv]
                    K = passes_at(T, level)
                    peer = peers.get((name, T, round(level, 4)), peers.get((name, T, level), (float("nan"), "")))[0]
                    for mf in ms:
                        m = int(round(mf * K)) if mf < 1 else int(mf)
                        if K - m < 2:
                            continue
                        sc = spaced(T, K + m)
                        su = subset(sc, K - m)
                        for mode in modes:
                            t0 = time.time()
                            o = em.run(s, l, T, sc, su, mode)
                            p = float(metrics.psnr(o, ref).mean())
                            w.writerow([name, T, round(level, 4), K, m, mode, " ".join(map(str, sc)), " ".join(map(str, su)),
                                        len(sc) + len(su), round(p, 4), peer, round(time.time() - t0, 1)])
                            f.flush()
                            print(name, T, lv, K, m, mode, f"{p:.3f}", f"peer {peer}", f"{time.time() - t0:.1f}s", flush=True)
            finally:
                em.close()
