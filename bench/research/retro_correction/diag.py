"""Per step of one preset run: |x - x*|, |m - m*| (m: what the scheduler gets; *: full computation) and the
interpolation error of the skipped steps (from this run's computed outputs, and from the full run's).
Usage (repository root): PYTHONPATH=bench:bench/research:bench/research/retro_correction diag.py MODEL STEPS PRESET"""
import sys, os, torch
import run as R
from quality import PRESETS, eval_set
from tcpade import zoo
torch.set_num_threads(1)
name, T, p = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = zoo.load(name); seeds, labels = eval_set(name, False, 16)
make = model.noise_scheduler
rec = {}
def recorder(store):
    s = make(); orig = s.step
    def step(mo, t, x, *a, **k):
        store.setdefault("m", []).append(mo.double().clone()); store.setdefault("x", []).append(x.double().clone())
        return orig(mo, t, x, *a, **k)
    s.step = step; return s
full = {}; model.noise_scheduler = lambda: recorder(full); model.sample(seeds, labels, steps=T)
cach = {}; model.noise_scheduler = lambda: recorder(cach)
cfg = dict(PRESETS)[p]()
_, summ = model.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
comp = sorted(summ.computed("cond"))
s = make(); s.set_timesteps(T); a, b, tt = R.coefficients(s)
print("computed", comp)
n = lambda v: float(v.norm())
for i in range(T):
    line = f"{i:2d} {'C' if i in comp else 's'} |m*|={n(full['m'][i]):8.2f} |x-x*|={n(cach['x'][i]-full['x'][i]):7.3f} |m-m*|={n(cach['m'][i]-full['m'][i]):7.3f}"
    if i not in comp:
        kp = max(c for c in comp if c < i); nx = [c for c in comp if c > i]
        if nx:
            k = nx[0]; cs = [c for c in comp if c < i]
            for pts, lab in (([kp, k], "lin"), ((cs[-2:] + [k]) if len(cs) > 1 else [kp, k], "quad")):
                w = R.interp_weights([tt[q] for q in pts], tt[i])
                mt = sum(wi * cach['m'][q] for wi, q in zip(w, pts)); mf = sum(wi * full['m'][q] for wi, q in zip(w, pts))
                line += f" {lab}: |m~-m*|={n(mt-full['m'][i]):7.3f} (full-traj interp {n(mf-full['m'][i]):7.3f})"
    print(line)
