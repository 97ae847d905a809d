"""The spaced rule with steps 0 and 1 first (lead 2) on the run's times (weight 0.5) against the
shipped default (lead 1, weight 0.5), at every level of bench/defaults.py, every zoo model.
Usage (repository root): PYTHONPATH=bench lead2.py OUT.csv  (rows as bench/defaults.py writes them)."""
import csv
import sys

import defaults as D
import torch

D.RULES["linear, lead 2, time 0.5"] = ("linear", 2, 0.5)
torch.set_num_threads(1)
rows = D.run(D.MODELS, D.STEPS, lambda s: print(s, flush=True), "lead 2, time")
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
