"""TaylorSeer's own placement, (0, 2, 5, 8) of 10 (diffusers: steps 0 .. w-1, then every N-th
from w + 1), with a one-residual lead: residual vs stack-output extrapolation (not in the library).
Run: PYTHONPATH=bench python bench/research/stack_output/lead1.py MODELS"""
import sys, contextlib, types, torch
torch.set_num_threads(1)
import importlib.util
_spec = importlib.util.spec_from_file_location("probe", __file__.rsplit("/", 1)[0] + "/probe.py")
_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_probe)
stack_output = _probe.stack_output
from quality import eval_set
from tcpade import zoo, metrics
from tcpade.core import layout as L, coef as K
from tcpade.policy.config import TCPadeConfig

m1 = types.MappingProxyType({**L.MIN_HISTORY, "auto": 1, "linear": 1, "rational": 1})
L.MIN_HISTORY = K.MIN_HISTORY = m1
T = 10
for name in sys.argv[1].split(","):
    m = zoo.load(name)
    s, l = eval_set(name, False, 16)
    ref = m.sample(s, l, steps=T)
    for sched in [(0, 2, 5, 8), (0, 3, 6, 9), (0, 2, 5, 9), (0, 3, 7), (0, 4, 8)]:
        out = []
        for p in ("auto", "linear", "reuse"):
            for mode in ("res", "out"):
                cfg = TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T)
                with (stack_output() if mode == "out" else contextlib.nullcontext()):
                    o = m.sample(s, l, steps=T, config=cfg)
                out.append(f"{p[:4]}/{mode} {float(metrics.psnr(o, ref).mean()):.2f}")
        print(name, T, sched, " | ".join(out), flush=True)
