"""The shipped predictor "auto" (per branch) vs rational / linear on dit-photos and flux-shapes, 20 steps, budget10 and
slow schedules (no monkeypatching): is the per-branch choice below both fixed candidates?"""
import sys, os, torch
from quality import eval_set
from predictors import SAMPLES
from tcpade import metrics, zoo
from tcpade.policy.config import TCPadeConfig
torch.set_num_threads(1)
for name in ("dit-photos", "flux-shapes", "flux-photos"):
    m = zoo.load(name); seeds, labels = eval_set(name, quick=False, samples=SAMPLES[name])
    ref = m.sample(seeds, labels, steps=20)
    for K in (8, 10):
        sched = TCPadeConfig.budget(passes=K, use_calibrated=False).plan(20)
        out = []
        for pred in ("rational", "linear", "auto"):
            cfg = TCPadeConfig(predictor=pred, schedule=sched, schedule_steps=20)
            img, summ = m.sample(seeds, labels, steps=20, config=cfg, return_summary=True)
            picks = {b: [c for _, c in summ.choices(b)] for b in summ.branches} if pred == "auto" else ""
            out.append(f"{pred} {float(metrics.psnr(img, ref).mean()):.2f}")
        print(name, K, sched, " | ".join(out), picks, flush=True)
