"""Extrapolating the transformer's output instead of the block stack's residual: a measurement.

    python bench/output_level.py                      # every zoo model, 20 steps

TaylorSeer's "lite" mode (diffusers) extrapolates what the transformer returns; tcpade predicts
the residual of the block stack. This script runs, on each zoo model's calibrated schedule at
10, 8 and 7 of 20 passes (the same computed steps for every row), tcpade's block-level rational
predictor (the product) against a prototype output-level mode: on a skipped call the whole
transformer forward is replaced by the rational or linear extrapolation of the branch's last
computed outputs (tcpade's History and predict op on the outputs, h_in = 0). The prototype wraps
``transformer.forward`` here; it is not part of the library. PSNR against full computation of
bench/quality.py's evaluation inputs (10 samples per model). Writes bench/results/output_level.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name  # noqa: E402
from quality import eval_set  # noqa: E402

from tcpade import metrics, zoo  # noqa: E402
from tcpade.calibrate import shipped  # noqa: E402
from tcpade.config import TCPadeConfig  # noqa: E402
from tcpade.history import History  # noqa: E402

OUT = os.path.join(ROOT, "bench", "results")
MODELS = ("flux-digits", "wan-digits", "dit-faces", "flux-shapes", "dit-photos")


def output_level(model, seeds, labels, T, sched, variant):
    """Sample with skipped calls answered by extrapolating the branch's outputs (the prototype)."""
    tr = model.transformer
    orig = tr.forward
    st = dict(hist={}, k=-1, last_t=None, idx=0)
    sched = set(sched)

    def forward(*args, **kw):
        t = float(kw["timestep"].reshape(-1)[0])
        if t != st["last_t"]:  # a new step: the calls at one timestep are the CFG branches, in order
            st.update(k=st["k"] + 1, last_t=t, idx=0)
        else:
            st["idx"] += 1
        h = st["hist"].setdefault(st["idx"], History(nslots=3))
        if st["k"] in sched or h.count < 2:
            out = orig(*args, **kw)
            v = out[0] if isinstance(out, tuple) else out.sample
            h.record(torch.zeros_like(v), v)
            h.advance(t, True)
            return out
        z = torch.zeros(h.ring.shape[1:], dtype=h.ring.dtype)
        pred, _ = h.predict(z, h.coef(variant, "middle", t), variant)
        return (pred,)

    tr.forward = forward
    try:
        return model.sample(seeds, labels, steps=T)
    finally:
        del tr.forward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    T = 20
    lines = ["# Output-level extrapolation against tcpade's block-level prediction", "",
             f"Machine: {cpu_name()}, 1 torch thread; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. "
             f"Command: `python bench/output_level.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "PSNR (dB) against full computation, 20 steps, the model's calibrated schedule (the same computed steps "
             "in every column). `block rational` is tcpade; `output *` the prototype that extrapolates the "
             "transformer's output (not in the library).", "",
             "| model | passes | block rational | output rational | output linear | output best - block |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.models.split(","):
        m = zoo.load(name)
        seeds, labels = eval_set(name, False, args.samples)
        ref = m.sample(seeds, labels, steps=T)
        cal = shipped(name, T)
        for k in (10, 8, 7):
            sched = cal.schedules[k]
            cfg = TCPadeConfig(schedule=sched, schedule_steps=T)
            r = {"block": float(metrics.psnr(m.sample(seeds, labels, steps=T, config=cfg), ref).mean())}
            for v in ("rational", "linear"):
                r[v] = float(metrics.psnr(output_level(m, seeds, labels, T, sched, v), ref).mean())
            d = max(r["rational"], r["linear"]) - r["block"]
            lines.append(f"| {name} | {k} | {r['block']:.2f} | {r['rational']:.2f} | {r['linear']:.2f} | {d:+.2f} |")
            print(lines[-1], flush=True)
    with open(os.path.join(args.out, "output_level.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
