"""Residual vs stack-output extrapolation (a measurement, not in the library).

"res": the library as it is (predict R = h_out - h_in, add the call's h_in).
"out": the same ops fed a zero input, so the history holds the stack's h_out and a skip returns
the extrapolated h_out itself (what TaylorSeer whole-block does with its last block).
Run: PYTHONPATH=bench python bench/research/stack_output/probe.py MODELS [STEPS]"""
import sys, contextlib, torch
torch.set_num_threads(1)
from quality import eval_set
from tcpade import zoo, metrics
from tcpade.core.history import History
from tcpade.policy.config import TCPadeConfig
from tcpade.policy import schedules as S

_rec, _pred = History.record, History.predict


@contextlib.contextmanager
def stack_output():
    History.record = lambda self, h_in, h_out, probe=False: _rec(self, None, h_out, probe)
    History.predict = lambda self, h_in, *a, **k: _pred(self, None, *a, **k)
    try:
        yield
    finally:
        History.record, History.predict = _rec, _pred


def cases(T):
    if T == 10:
        return [(0, 1, 4, 7), (0, 1, 4, 8), (0, 4, 8), (0, 1, 8)]
    return [S.spaced(T, p, end=1) for p in (round(T / 2), round(T / 2.5), round(T / 2.9))]


def main():
    for name in sys.argv[1].split(","):
        Ts = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "10").split(",")]
        m = zoo.load(name)
        s, l = eval_set(name, False, 16)
        for T in Ts:
            ref = m.sample(s, l, steps=T)
            for sched in cases(T):
                out = []
                for p in ("auto", "linear", "reuse", "rational"):
                    if len(sched) == 3 and sched[1] > 1 and p != "reuse":
                        continue
                    for mode in ("res", "out"):
                        cfg = TCPadeConfig(predictor=p, schedule=sched, schedule_steps=T)
                        with (stack_output() if mode == "out" else contextlib.nullcontext()):
                            o = m.sample(s, l, steps=T, config=cfg)
                        out.append(f"{p[:4]}/{mode} {float(metrics.psnr(o, ref).mean()):.2f}")
                print(name, T, sched, " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
