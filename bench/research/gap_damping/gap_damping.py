"""Long-gap predictions: rational / linear / reuse / damped-toward-R1 variants / a per-gap rule / an online
chooser including reuse, on the sigma (schedule time) axis and on the step-index axis.

    python bench/gap_damping.py --models flux-photos --steps 10 --samples 4

Measurement prototype: no kernel change. Every predictor runs the rational kernel with modified
coefficients (tcpade.core.coef.build_coef): the prediction is w_main * main + c1 * R1 + c2 * R2, so
    linear   = rational with bmax = 0 (pole term off)
    reuse    = w_main 0, c1 1
    damped   = w_main d, c1 1 - d, d = f(g), g = (t_target - t_newest) / (t_newest - t_previous)
               (g = 1 / (|tau1| - 1) from time_weights' tau1)
    gaprule  = rational if g <= 1, linear if g <= 2, else reuse
    choose3  = online: at every computed step with >= 2 stored residuals, predict that step from the
               stored ones with rational, linear and reuse, accumulate ||R_hat - R||^2 / ||R||^2 per
               branch over the run; the skips use the candidate with the smallest sum (ties: rational)
               (host-side here; on the device it is auto's mask with a third candidate)
The axis: "sigma" passes the schedule's times (flux: sigma; DiT: the timestep), "index" the step index.
PSNR against full computation of the same inputs (bench/quality.py's eval_set, first --samples).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

from quality import eval_set  # noqa: E402
from predictors import SAMPLES  # noqa: E402

from tcpade import metrics, zoo  # noqa: E402
from tcpade.core import coef as K  # noqa: E402
from tcpade.core.history import History  # noqa: E402
from tcpade.policy import runtime as RT  # noqa: E402
from tcpade.policy.config import TCPadeConfig  # noqa: E402

STATE = dict(axis="sigma", rule="rational")
TIME_INDEX = {}  # schedule time -> step index (filled by every run's decide calls; cleared per T)
ACC = {}  # id(History) -> {candidate: accumulated relative squared error}
PICKS = []  # (step, candidate) of every chooser-driven skip
CAND3 = ("rational", "linear", "reuse")


def gap_ratio(c):
    tau1 = c[K.TAU1]
    if c[K.LAM2] == 1.0 and c[K.LAM1] == 0.0:  # one residual / degenerate grid: the prediction is R1
        return math.inf
    a = abs(tau1)
    return 1.0 / (a - 1.0) if a > 1.0 else math.inf


def apply_rule(c, rule):
    c = list(c)
    g = gap_ratio(c)
    if rule.startswith("gaprule"):
        rule = "rational" if g <= 1.0 else ("linear" if g <= 2.0 else "reuse")
    if rule == "rational":
        return c
    if rule == "linear":
        c[K.BMAX] = 0.0
        return c
    if rule == "reuse":
        c[K.W_MAIN], c[K.C1], c[K.C2] = 0.0, 1.0, 0.0
        return c
    # damped: "harm" d = 1/(1+g); "exp<a>" d = exp(-a (g-1)+); suffix "-lin": linear main
    base = rule
    if base.endswith("-lin"):
        c[K.BMAX] = 0.0
        base = base[:-4]
    if base == "harm":
        d = 1.0 / (1.0 + g)
    elif base.startswith("hyp"):  # d = 1/(1 + a g)
        d = 1.0 / (1.0 + float(base[3:]) * g)
    elif base.startswith("exp"):
        d = math.exp(-float(base[3:]) * max(g - 1.0, 0.0))
    elif base.startswith("cut"):  # d = 1 up to g <= x, then 0
        d = 1.0 if g <= float(base[3:]) else 0.0
    else:
        raise ValueError(rule)
    if not math.isfinite(d):
        d = 0.0
    c[K.W_MAIN], c[K.C1], c[K.C2] = d, 1.0 - d, 0.0
    return c


def chooser(rule):
    """"choose3" (rational, linear, reuse; rational before any error is measured), or
    "choose:<cand>+<cand>..:<default>"."""
    if rule == "choose3":
        return CAND3, "rational"
    _, cands, default = rule.split(":")[:3]
    return tuple(cands.split("+")), default


def raw_coef(self, variant, stage, t_target, **kw):
    if not self.has_prev:
        kw["gamma"] = 0.0
    times = self.recent_times()
    if STATE["axis"] == "index":
        times = [TIME_INDEX.get(float(t), math.nan) if math.isfinite(t) else t for t in times]
        t_target = TIME_INDEX[float(t_target)]
    return K.build_coef(variant, stage, times, t_target, self.count, self.nslots, **kw)


def key(hist):
    """The accumulator of a history: its own, or with "@shared" one for every branch (CFG's cond and
    uncond histories pool their measured errors and make the same choice)."""
    return 0 if STATE["rule"].endswith("@shared") else id(hist)


def coef_values(self, variant, stage, t_target, **kw):
    c = raw_coef(self, variant, stage, t_target, **kw)
    rule = STATE["rule"].split("@")[0]
    if rule.startswith("hypfit"):  # "hypfit-<mean|last>-<a0>": d = 1/(1 + a g), a fitted on computed steps
        _, how, a0 = rule.split("-")
        fits = ACC.get(key(self), {}).get("a", [])
        a = float(a0) if not fits else (sum(fits) / len(fits) if how == "mean" else fits[-1])
        PICKS.append(f"{a:.2f}")
        return apply_rule(c, f"hyp{a}")
    if rule.startswith("choose"):
        cands, default = chooser(rule)
        acc = ACC.get(key(self))
        rule = default if not acc else min(cands, key=lambda n: (acc[n], cands.index(n)))
        PICKS.append(rule)
    return apply_rule(c, rule)


History.coef_values = coef_values

_orig_reset = History.reset


def _reset(self, *a, **k):
    ACC.pop(id(self), None)
    ACC.pop(0, None)  # a new run (every branch's history resets at its start; the shared one with them)
    return _orig_reset(self, *a, **k)


History.reset = _reset

_orig_decide = RT.Runtime.decide


def _decide(self, branch, timestep, *a, **k):
    out = _orig_decide(self, branch, timestep, *a, **k)
    p = self.branches[branch].pending
    if p is not None:
        TIME_INDEX.setdefault(float(p.t), p.k)
    return out


RT.Runtime.decide = _decide

_orig_finish = RT.Runtime.finish


def _finish(self, branch, h_in, h_out):
    b = self.branches.get(branch)
    p = b.pending if b is not None else None
    hist = b.history if b is not None else None
    if STATE["rule"].startswith("choose") and p is not None and h_out is not None and hist.count >= 2 \
            and hist.ring is not None:
        cands, _ = chooser(STATE["rule"].split("@")[0])
        base = raw_coef(hist, "rational", p.stage, p.t)
        r = h_out.float() - (h_in.float() if h_in is not None else 0.0)
        r2 = float((r * r).sum()) or 1.0
        acc = ACC.setdefault(key(hist), {n: 0.0 for n in cands})
        for n in cands:
            cf = K.coef_tensor(apply_rule(base, n), hist.ring.device)
            out, _ = hist.predict(h_in, cf, "rational", store=False, write_out=True)
            rh = out.float() - (h_in.float() if h_in is not None else 0.0)
            e = float(((rh - r) ** 2).sum()) / r2
            # ":last" (4th field): only the newest computed step's errors count (else their sum over the run);
            # with "@shared" the branches' errors of one step add up (the newest step's, with ":last")
            if STATE["rule"].split("@")[0].endswith(":last") and ACC.get(("step", key(hist))) != p.k:
                acc[n] = 0.0
            acc[n] += e
        ACC[("step", key(hist))] = p.k
    if STATE["rule"].startswith("hypfit") and p is not None and h_out is not None and hist.count >= 2 \
            and hist.ring is not None:
        # the damping weight that would have predicted this step best, d* = <R - R1, M - R1> / ||M - R1||^2
        # (M: the rational prediction), at this step's gap ratio g_c -> a = (1/d* - 1) / g_c
        base = raw_coef(hist, "rational", p.stage, p.t)
        g = gap_ratio(base)
        if math.isfinite(g) and g > 0:
            r = h_out.float() - (h_in.float() if h_in is not None else 0.0)
            cf = K.coef_tensor(base, hist.ring.device)
            out, _ = hist.predict(h_in, cf, "rational", store=False, write_out=True)
            m = out.float() - (h_in.float() if h_in is not None else 0.0)
            r1 = hist.ring[int(hist.slots[0])].float()
            dm, dr = m - r1, r - r1
            den = float((dm * dm).sum())
            d = min(1.0, max(0.02, float((dr * dm).sum()) / den)) if den > 0 else 1.0
            ACC.setdefault(key(hist), {}).setdefault("a", []).append((1.0 / d - 1.0) / g)
    return _orig_finish(self, branch, h_in, h_out)


RT.Runtime.finish = _finish


def schedules_for(T):
    C = TCPadeConfig
    s = {}
    for name, cfg in (("fast", C.fast(use_calibrated=False)), ("slow", C.slow(use_calibrated=False))):
        s.setdefault(cfg.plan(T), []).append(name)
    if T == 20:
        s.setdefault(C.budget(passes=10, use_calibrated=False).plan(T), []).append("budget10")
    if T == 10:
        s.setdefault(C.budget(passes=5, use_calibrated=False).plan(T), []).append("budget5")
        s.setdefault((0, 1, 4, 7), []).append("taylorseer")
    return {"/".join(v): k for k, v in s.items()}


PREDS = ("rational", "linear", "reuse", "harm", "hyp2", "hyp4", "exp0.5", "exp1", "exp2", "harm-lin", "hyp2-lin",
         "gaprule", "choose3", "choose:rational+linear+reuse:reuse", "choose:rational+linear+reuse:harm",
         "choose:rational+linear+reuse+harm:harm", "choose:rational+reuse:rational", "choose:rational+linear:rational")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="flux-photos,flux-shapes,dit-photos")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--samples", type=int, default=0, help="0: predictors.py's SAMPLES")
    ap.add_argument("--preds", default=",".join(PREDS))
    ap.add_argument("--axes", default="sigma,index")
    ap.add_argument("--scheds", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "gap_damping.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    exists = os.path.exists(args.out)
    f = open(args.out, "a", newline="")
    w = csv.DictWriter(f, fieldnames=["model", "steps", "schedule_name", "schedule", "axis", "predictor", "psnr",
                                      "picks"])
    if not exists:
        w.writeheader()
    for name in args.models.split(","):
        model = zoo.load(name)
        seeds, labels = eval_set(name, quick=False, samples=args.samples or SAMPLES[name])
        for T in map(int, args.steps.split(",")):
            # the index map first: a plain run fills TIME_INDEX with every step's time
            TIME_INDEX.clear()
            model.sample(seeds[:1], labels[:1], steps=T, config=TCPadeConfig(predictor="rational", schedule=tuple(
                range(T)), schedule_steps=T))
            t0 = time.time()
            ref = model.sample(seeds, labels, steps=T)
            print(f"{name} T={T} ref {time.time() - t0:.1f}s", flush=True)
            for sname, sched in schedules_for(T).items():
                if args.scheds and not any(x in sname for x in args.scheds.split(",")):
                    continue
                for axis in args.axes.split(","):
                    for pred in args.preds.split(","):
                        if pred == "reuse" and axis != args.axes.split(",")[0]:
                            continue  # axis-independent
                        STATE.update(axis=axis, rule=pred)
                        PICKS.clear()
                        ACC.clear()
                        cfg = TCPadeConfig(predictor="rational", schedule=tuple(sched), schedule_steps=T)
                        t0 = time.time()
                        img, summ = model.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
                        b = next(iter(summ.branches))
                        assert summ.computed(b) == list(sched), (summ.computed(b), sched)
                        ps = float(metrics.psnr(img, ref).mean())
                        picks = " ".join(f"{n}:{PICKS.count(n)}" for n in dict.fromkeys(PICKS)) if pred.startswith(("choose", "hypfit")) else ""
                        row = dict(model=name, steps=T, schedule_name=sname, schedule=" ".join(map(str, sched)),
                                   axis=axis, predictor=pred, psnr=round(ps, 3), picks=picks)
                        w.writerow(row)
                        f.flush()
                        rows.append(row)
                        print(f"  {name} T={T} {sname:12s} {axis:5s} {pred:9s} {ps:6.2f} {picks} "
                              f"({time.time() - t0:.1f}s)", flush=True)
    f.close()


if __name__ == "__main__":
    main()
