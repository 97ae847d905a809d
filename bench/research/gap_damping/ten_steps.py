"""Placements of 3 and 4 passes at 10 steps (ten_steps.md). Run: PYTHONPATH=bench python bench/research/gap_damping/ten_steps.py MODELS"""
import sys, torch
torch.set_num_threads(1)
from quality import eval_set
from tcpade import zoo, metrics
from tcpade.policy.config import TCPadeConfig
for name in sys.argv[1].split(","):
    m = zoo.load(name); s, l = eval_set(name, False, 16)
    T = 10
    ref = m.sample(s, l, steps=T)
    out = []
    for sched, preds in [((0,4,8),("reuse",)), ((0,3,7),("reuse",)), ((0,1,5),("auto","reuse")), ((0,1,6),("auto",)), ((0,1,4,7),("auto","reuse","linear")), ((0,1,4,8),("auto",)), ((0,1,3,6),("auto",))]:
        for p in preds:
            o = m.sample(s, l, steps=T, config=TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T))
            out.append(f"{sched}{p[:4]} {float(metrics.psnr(o, ref).mean()):.2f}")
    print(name, " | ".join(out), flush=True)
