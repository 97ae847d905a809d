"""The prototype's config fields (damping, time_axis) against bench/gap_damping.py's monkeypatched numbers."""
import sys, os, torch
from quality import eval_set
from predictors import SAMPLES
from tcpade import metrics, zoo
from tcpade.policy.config import TCPadeConfig
torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else "flux-photos"
m = zoo.load(name); seeds, labels = eval_set(name, quick=False, samples=SAMPLES[name])
for T, sched in ((10, (0, 1, 4, 7)), (20, (0, 1, 4, 7, 11, 14, 18))):
    ref = m.sample(seeds, labels, steps=T)
    for pred, damp, axis in (("rational", 0.0, "schedule"), ("rational", 0.0, "index"), ("rational", 1.0, "schedule"),
                             ("rational", 1.0, "index"), ("rational", 2.0, "index"), ("linear", 1.0, "index"),
                             ("reuse", 0.0, "schedule"), ("auto", 0.0, "index")):
        cfg = TCPadeConfig(predictor=pred, schedule=sched, schedule_steps=T, damping=damp, time_axis=axis)
        img = m.sample(seeds, labels, steps=T, config=cfg)
        print(name, T, sched, pred, damp, axis, f"{float(metrics.psnr(img, ref).mean()):.2f}", flush=True)
