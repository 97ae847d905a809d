"""Do calibrated schedules still pay with the spaced rule of step 0 first and linear? (a measurement)

For every zoo model at T = 10, 20, 28 and 50: ``tcpade.calibrate`` with the linear predictor and the trace
search (``method="trace"``: 20 runs up to 20 steps, 40 above) on bench/calibration.py's four calibration
inputs, at the pass counts of the shipped calibrations, validated on its 16 held-out inputs against the
spaced rule with linear (what slow() / fast() run where no calibrated schedule is used). Nothing is shipped.
Run: PYTHONPATH=bench python bench/research/linear_calibration/run.py OUT.csv"""
import csv, os, sys, time
import torch
torch.set_num_threads(1)
import tcpade
from tcpade import zoo
from tcpade.policy import schedules
from calibration import CAL_SEEDS, CAL_LABELS, holdout_inputs

out = sys.argv[1]
shipped = tcpade.calibrate.load(schedules.SHIPPED, register=False)
schedules.clear(shipped=False)
new = not os.path.exists(out)
f = open(out, "a", newline="")
w = csv.writer(f)
if new:
    w.writerow(["model", "steps", "passes", "linear_calibrated_db", "spaced_linear_db", "margin_db", "schedule",
                "runs", "seconds", "shipped_predictor", "shipped_used"])
for name in ("flux-digits", "wan-digits", "dit-faces", "flux-shapes", "dit-photos", "flux-photos"):
    model = zoo.load(name)
    held = holdout_inputs(name, 16)
    for T in (10, 20, 28, 50):
        ship = [c for c in shipped if c.name == name and c.steps == T]
        ks = sorted({k for c in ship for k in c.schedules}, reverse=True)
        t0 = time.perf_counter()
        cal = tcpade.calibrate(model, list(zip(CAL_SEEDS, CAL_LABELS[name])), passes=ks, steps=T, predictor="linear",
                               method="trace", holdout=held, progress=False)
        dt = time.perf_counter() - t0
        for k in ks:
            c_db, s_db = cal.validation[k]
            used = [c.predictor for c in ship if k in c.schedules and c.used(k)]
            w.writerow([name, T, k, round(c_db, 4), round(s_db, 4), round(c_db - s_db, 4),
                        " ".join(map(str, cal.schedules[k])), cal.runs, round(dt, 1), ",".join(c.predictor for c in ship),
                        ",".join(used)])
        f.flush()
        print(name, T, f"{dt:.0f} s", " ".join(f"{k}:{cal.validation[k][0] - cal.validation[k][1]:+.2f}" for k in ks),
              flush=True)
