"""The grid of bench/research/retro_correction and bench/research/x0_extrap (measurement only): for
every zoo model, step count and preset (bench/quality.py's PRESETS, as a user takes them), the
library's own run of the preset (its summary gives the computed steps, the same in both CFG
branches: asserted), then one run per variant on those computed steps, each scored by PSNR against
full computation of bench/quality.py's evaluation inputs and appended to a CSV.

``grid(argv, base_column, run_variant)``: argv = MODELS STEPS PRESETS VARIANTS OUT.csv (PRESETS
';'-separated); ``run_variant(model, T, computed, variant, config, seeds, labels)`` returns the
variant's images; ``base_column`` names the CSV column of the library run's PSNR."""
from __future__ import annotations

import csv
import os

import torch
from quality import PRESETS, eval_set

from tcpade import zoo
from tcpade.tools import metrics


def grid(argv, base_column: str, run_variant) -> None:
    models, steps = argv[0].split(","), [int(s) for s in argv[1].split(",")]
    presets, variants, out = argv[2].split(";"), argv[3].split(","), argv[4]
    make_preset = dict(PRESETS)
    torch.set_num_threads(1)
    new = not os.path.exists(out)
    with open(out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["model", "steps", "preset", "variant", "passes", "psnr", base_column, "gain"])
        for name in models:
            model = zoo.load(name)
            seeds, labels = eval_set(name, False, 16)
            for T in steps:
                ref = model.sample(seeds, labels, steps=T)
                for p in presets:
                    cfg = make_preset[p]()
                    base, summ = model.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
                    comp = frozenset(summ.computed("cond"))
                    assert all(frozenset(summ.computed(b)) == comp for b in summ.branches), "branches differ"
                    bp = float(metrics.psnr(base, ref).mean())
                    for v in variants:
                        img = run_variant(model, T, comp, v, cfg, seeds, labels)
                        ps = float(metrics.psnr(img, ref).mean())
                        w.writerow([name, T, p, v, len(comp), f"{ps:.4f}", f"{bp:.4f}", f"{ps - bp:+.4f}"])
                        f.flush()
                        print(name, T, p, v, len(comp), f"{bp:.2f} -> {ps:.2f} ({ps - bp:+.2f})", sorted(comp),
                              flush=True)  # fmt: skip
