"""The emulation's whole-stack skipping (n_f = n_b = 0, ``ours:<variant>``) against the library on the
same inputs and schedule: PSNR of each against full computation, and of one against the other.

    PYTHONPATH=bench:bench/research/partial_stack nice -n 19 .venv/bin/python \
        bench/research/partial_stack/check_emulation.py --models flux-photos,dit-photos --steps 10
"""

from __future__ import annotations

import argparse

import torch
from emulate import Emulator
from quality import eval_set

from tcpade import zoo
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.schedules import spaced
from tcpade.tools import metrics


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flux-photos,dit-photos")
    ap.add_argument("--steps", default="10")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.models.split(","):
        model = zoo.load(name)
        seeds, labels = eval_set(name, False, 16)
        for T in map(int, args.steps.split(",")):
            ref = model.sample(seeds, labels, steps=T)
            sched = spaced(T, args.passes)
            for variant in ("rational", "linear", "reuse"):
                cfg = TCPadeConfig(predictor=variant, schedule=sched, schedule_steps=T)
                lib, summ = model.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
                assert all(summ.computed(b) == list(sched) for b in summ.branches), summ
                emu = Emulator(model)
                try:
                    em = emu.run(seeds, labels, T, sched, 0, 0, f"ours:{variant}")
                finally:
                    emu.close()
                p_lib = float(metrics.psnr(lib, ref).mean())
                p_emu = float(metrics.psnr(em, ref).mean())
                p_x = float(metrics.psnr(em, lib).mean())
                print(
                    f"{name} T={T} {sched} {variant:8s} library {p_lib:.3f} emulation {p_emu:.3f} "
                    f"emulation vs library {p_x:.2f} max|diff| {float((em - lib).abs().max()):.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
