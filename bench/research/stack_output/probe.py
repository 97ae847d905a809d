"""Residual vs stack-output extrapolation on given schedules (a measurement).

"res": ``TCPadeConfig(extrapolate="residual")``, the block stack's residual added to the call's h_in;
"out": ``extrapolate="h_out"``, the stack's h_out itself (what TaylorSeer whole-block does with its
last block). (The numbers in README.md were measured before the field existed, with the history fed
a zero input by a patch of ``History.record`` / ``predict``: the same computation as the field.)

Case sets: "spaced" (at 10 steps 0 1 4 7, 0 1 4 8, 0 4 8, 0 1 8; at other T the spaced rule of the
time, steps 0 and 1 first, at 2x, 2.5x, 2.9x) and "taylorseer" (10 steps: diffusers TaylorSeer's own
placement 0 2 5 8 and neighbours, each starting from one residual).
Run: PYTHONPATH=bench python bench/research/stack_output/probe.py MODELS [STEPS] [spaced|taylorseer]"""
import sys, torch
torch.set_num_threads(1)
from quality import eval_set
from tcpade import zoo, metrics
from tcpade.policy.config import TCPadeConfig
from tcpade.policy import schedules as S

TARGET = {"res": "residual", "out": "h_out"}


def cases(T, which):
    """(schedule, predictors) pairs of a case set."""
    if which == "taylorseer":
        return [(s, ("auto", "linear", "reuse")) for s in [(0, 2, 5, 8), (0, 3, 6, 9), (0, 2, 5, 9), (0, 3, 7), (0, 4, 8)]]
    if T == 10:
        scheds = [(0, 1, 4, 7), (0, 1, 4, 8), (0, 4, 8), (0, 1, 8)]
    else:
        scheds = [S.spaced(T, p, 2, end=1) for p in (round(T / 2), round(T / 2.5), round(T / 2.9))]
    # (0 4 8 starts from one residual: only reuse predicted from one before the library allowed it)
    return [(s, ("reuse",) if s[1] > 1 and len(s) == 3 else ("auto", "linear", "reuse", "rational")) for s in scheds]


def main():
    names = sys.argv[1].split(",")
    Ts = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "10").split(",")]
    which = sys.argv[3] if len(sys.argv) > 3 else "spaced"
    for name in names:
        m = zoo.load(name)
        s, l = eval_set(name, False, 16)
        for T in Ts:
            ref = m.sample(s, l, steps=T)
            for sched, preds in cases(T, which):
                out = []
                for p in preds:
                    for mode, target in TARGET.items():
                        cfg = TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T, extrapolate=target)
                        o = m.sample(s, l, steps=T, config=cfg)
                        out.append(f"{p[:4]}/{mode} {float(metrics.psnr(o, ref).mean()):.2f}")
                print(name, T, sched, " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
