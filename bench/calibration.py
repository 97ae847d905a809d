"""Calibrated schedules against evenly spaced ones, tcpade's presets and the best peer, on the zoo.

    python bench/calibration.py                       # the three zoo models, 20 and 50 steps (~1 h, 1 thread)
    python bench/calibration.py --models flux-digits --steps 20 --no-ship

For each zoo model and step count T:

* calibration: ``tcpade.calibrate`` (method "refine": best evenly spaced schedule, then hill
  climbing; rational predictor) on CALIBRATION inputs -- seeds 0..3 with the labels below --
  against full computation of those inputs, at every pass count evaluated; also on the first 1
  and 2 of them (how many inputs are enough; --ablate). Cost: runs, block-stack calls, minutes.
  (Greedy removal, exact and lazy, was run on flux-digits at 20 steps by an earlier version of
  this script: bench/results/calibration_search_flux20.csv.)
* evaluation on OTHER inputs: the evaluation set of bench/quality.py (seeds 1000.., every
  class), so the peers' rows of bench/results/quality_<model>.csv (run on exactly those inputs,
  MagCache calibrated on them) are the peers here. At each pass count K from 2x to 3.3x:
  the calibrated schedule; the spaced rule (``TCPadeConfig.budget(passes=K)`` with no calibrated
  schedule); the best of a family of evenly spaced schedules (warm-up 2-3 steps, then a constant
  gap, the last 0-2 steps predicted; best chosen on the evaluation set itself, i.e. an oracle for
  "evenly spaced"); tcpade's presets at their own passes; the best peer with at least that speedup.
* transfer: PSNR on evaluation samples of the classes the calibration saw vs the others.

Writes bench/results/calibration.md and calibration.csv, and (unless --no-ship) the 4-input
calibrations to tcpade/zoo/schedules.json, which the budget presets then use on these models.
The shipped calibrations are validated on HOLDOUT inputs (seeds 5000.., labels 0, 1, .. in
turn; neither the calibration seeds nor bench/quality.py's 1000..): a pass count's schedule is
used only where it beats the spaced rule there (``tcpade.calibrate``'s ``holdout=``).

    python bench/calibration.py --validate-shipped    # re-validate every shipped calibration

``--validate-shipped``: every entry of tcpade/zoo/schedules.json (``--models``, ``--steps``,
``--predictors`` to narrow) checked on ``--holdout-samples`` HOLDOUT inputs
(``tcpade.calibrate.validate``): per pass count, the calibrated schedule and the spaced rule
against full computation. The checks are written into the entries (a pass count whose
schedule lost is kept, marked not used: the presets run the spaced rule there) and the table
into bench/results/calibration_validation.md / .csv.

``--carry``: one calibration, every step count: the shipped 20-step calibrations carried to
other step counts (``tcpade.policy.schedules.carry``) against the shipped per-T calibrations
and the spaced rule, on the same HOLDOUT inputs (added to calibration_validation.md / .csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name, zoo_times
from quality import eval_set

import tcpade
from tcpade import metrics, schedules, zoo
from tcpade.policy.config import TCPadeConfig

OUT = os.path.join(ROOT, "bench", "results")
CAL_SEEDS = (0, 1, 2, 3)
HOLDOUT_SEED0 = 5000  # held-out validation inputs: seeds 5000.. (the calibration's are 0..3, quality.py's 1000..)
# Calibration labels: four classes of ten (flux, wan: six classes never seen), both of DiT's two.
CAL_LABELS = {"flux-digits": (0, 1, 2, 3), "dit-faces": (0, 1, 0, 1), "wan-digits": (0, 1, 2, 3),
              "flux-shapes": (0, 1, 2, 3), "dit-photos": (0, 1, 2, 3),
              "flux-photos": (0, 1, 2, 3)}  # flux-shapes: 12 of 16 unseen, dit-photos and flux-photos 8 of 12


def holdout_inputs(name, n):
    """The ``n`` held-out validation inputs of a zoo model: (seed 5000 + i, label i mod classes)."""
    classes = zoo.SPECS[name].num_classes
    return [(HOLDOUT_SEED0 + i, i % classes) for i in range(n)]


def levels(T):
    """Pass counts from 2x to 3.3x fewer block-stack passes."""
    if T == 20:
        return [10, 9, 8, 7, 6]
    return sorted({T // 2, round(T / 2.5), round(T / 2.9), math.ceil(T / (10 / 3) - 1e-9)}, reverse=True)


PEERS_DIR = [OUT]  # where bench/quality.py's CSVs are read from (--peers)
HOLDOUT_SAMPLES = [16]  # held-out validation inputs per model (--holdout-samples)
PREDICTOR = ["rational"]  # the predictor the schedules are searched for (--predictor; with --search-only)


def peers_from_csv(name, T):
    path = os.path.join(PEERS_DIR[0], f"quality_{name}.csv")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if int(r["steps"]) == T and r["group"] != "full" and not r["group"].startswith("tcpade"):
                rows.append(dict(group=r["group"], label=r["label"], speedup=float(r["speedup"]), psnr=float(r["psnr"])))
    return rows


def best_peer(peers, T, K):
    cands = [p for p in peers if p["speedup"] >= T / K * (1 - 1e-3)]
    return max(cands, key=lambda p: p["psnr"], default=None)


class Evaluator:
    def __init__(self, model, T, seeds, labels, seen):
        self.model, self.T, self.seeds, self.labels = model, T, seeds, labels
        self.ref = model.sample(seeds, labels, steps=T)
        self.seen = torch.tensor([lab in seen for lab in labels])
        self.runs = 0

    def peer(self, method):
        """A peer (bench/peers.py Method) on the evaluation inputs: PSNR and its MAC speedup."""
        from peers import count_macs

        method.enable(self.model, self.T, self.seeds, self.labels)
        try:
            with count_macs(self.model.transformer) as c:
                images = self.model.sample(self.seeds, self.labels, steps=self.T)
        finally:
            method.disable(self.model)
        if not hasattr(self, "_macs_full"):
            with count_macs(self.model.transformer) as f:
                self.model.sample(self.seeds, self.labels, steps=self.T)
            self._macs_full = f.macs
        self.runs += 1
        return dict(psnr=float(metrics.psnr(images, self.ref).mean()), speedup=self._macs_full / max(c.macs, 1))

    def __call__(self, config):
        images, summ = self.model.sample(self.seeds, self.labels, steps=self.T, config=config, return_summary=True)
        self.runs += 1
        p = metrics.psnr(images, self.ref)
        passes = max(len(summ.computed(b)) for b in summ.branches)
        out = dict(psnr=float(p.mean()), ssim=float(metrics.ssim(images, self.ref).mean()), passes=passes,
                   computed=summ.computed(next(iter(summ.branches))),
                   psnr_seen=float(p[self.seen].mean()) if self.seen.any() else math.nan,
                   psnr_unseen=float(p[~self.seen].mean()) if (~self.seen).any() else math.nan)  # fmt: skip
        return out


def bench(name, T, log, ship_store, ablate, lazy_too, sweeps, reuse=False, search_only=False, samples=None):
    torch.manual_seed(0)
    model = zoo.load(name)
    seeds, labels = eval_set(name, quick=False, samples=samples)
    cal_inputs = list(zip(CAL_SEEDS, CAL_LABELS[name]))
    ks = levels(T)
    kmin = min(ks)  # the search stops at the fewest passes evaluated
    rows, costs = [], []

    def cal(n, method="refine", sweeps=sweeps):
        if reuse and n == 4 and method == "refine":  # the shipped 4-input calibration, not searched again
            c = tcpade.calibrate.shipped(name, T)
            if c is None:
                raise SystemExit(f"--reuse: no shipped calibration of {name} at {T} steps in {schedules.SHIPPED}")
            costs.append(dict(model=name, steps=T, inputs=c.inputs, method=f"{c.method}, {sweeps} sweep(s)",
                              runs=c.runs, calls=c.calls, minutes=c.seconds / 60, branches=c.extra["branches"]))  # fmt: skip
            log(f"  shipped calibration {name} T={T}: {c.runs} runs, {c.calls} calls, {costs[-1]['minutes']:.2f} min")
            return c
        t0 = time.perf_counter()
        held = holdout_inputs(name, HOLDOUT_SAMPLES[0]) if n == 4 and method == "refine" else False
        c = tcpade.calibrate(model, cal_inputs[:n], passes=ks, steps=T, method=method, progress=False, sweeps=sweeps,
                             predictor=PREDICTOR[0], holdout=held)  # fmt: skip
        tag = method + (f", {sweeps} sweep(s)" if method == "refine" else "")
        costs.append(dict(model=name, steps=T, inputs=n, method=tag, runs=c.runs, calls=c.calls,
                          minutes=(time.perf_counter() - t0) / 60, branches=c.extra["branches"]))  # fmt: skip
        log(f"  calibrated {name} T={T} n={n} {tag}: {c.runs} runs, {c.calls} calls, {costs[-1]['minutes']:.2f} min")
        return c

    cals = {4: cal(4)}
    if ablate:
        cals[1], cals[2] = cal(1, sweeps=1), cal(2, sweeps=1)
    if lazy_too:
        cals["lazy"] = cal(4, "lazy")
    ship_store.append(cals[4])
    if search_only:
        return rows, costs

    ev = Evaluator(model, T, seeds, labels, seen=set(CAL_LABELS[name]))
    peers = peers_from_csv(name, T)

    def add(method, K, res, **extra):
        row = dict(model=name, steps=T, method=method, K=K, passes=res["passes"], speedup=T / res["passes"],
                   psnr=res["psnr"], ssim=res["ssim"], psnr_seen=res["psnr_seen"], psnr_unseen=res["psnr_unseen"],
                   schedule=" ".join(map(str, res["computed"])), **extra)  # fmt: skip
        rows.append(row)
        log(f"  {method:24s} K={K:2d} passes={res['passes']:2d} psnr={res['psnr']:6.2f} [{row['schedule']}]")

    for K in ks:
        for key, c in cals.items():
            tag = "calibrated" if key == 4 else (f"calibrated n={key}" if key != "lazy" else "calibrated lazy greedy")
            add(tag, K, ev(c.config(K)))
        add("budget (spaced rule)", K, ev(TCPadeConfig.budget(passes=K, use_calibrated=False)))
        best = None
        for sched in schedules.even_family(T, K):
            res = ev(TCPadeConfig(schedule=sched, schedule_steps=T))
            if best is None or res["psnr"] > best["psnr"]:
                best = res
        add("best evenly spaced", K, best)
        # the preset with this model's calibration registered: it must pick the calibrated schedule
        cals[4].register()
        res = ev(TCPadeConfig.budget(passes=K))
        assert res["computed"] == list(cals[4].schedule(K)), (res["computed"], cals[4].schedule(K))
        schedules.clear()
        # cache-dit's fixed step mask fed the calibrated steps, with each of its calibrators
        import peers as P

        best_mask = None
        for calib in P.MASK_CALIBRATORS:
            m = P.cachedit_mask(P.mask_from_steps(cals[4].schedule(K), T), calib)
            res = ev.peer(m)
            log(f"  {m.label:24s} K={K:2d} x{res['speedup']:.2f} psnr={res['psnr']:6.2f}")
            if best_mask is None or res["psnr"] > best_mask[1]["psnr"]:
                best_mask = (m.label, res)
        rows.append(dict(model=name, steps=T, method="cache-dit mask, same steps", K=K, passes=K,
                         speedup=best_mask[1]["speedup"], psnr=best_mask[1]["psnr"], ssim=math.nan, psnr_seen=math.nan,
                         psnr_unseen=math.nan, schedule=best_mask[0]))  # fmt: skip
        bp = best_peer(peers, T, K)
        if bp is not None:
            rows.append(dict(model=name, steps=T, method="best peer", K=K, passes="", speedup=bp["speedup"],
                             psnr=bp["psnr"], ssim=math.nan, psnr_seen=math.nan, psnr_unseen=math.nan,
                             schedule=bp["label"]))  # fmt: skip
            log(f"  best peer K={K}: {bp['label']} x{bp['speedup']:.2f} {bp['psnr']:.2f}")
    for pname in ("slow", "fast", "adaptive"):
        res = ev(getattr(TCPadeConfig, pname)())
        add(f"preset {pname}", res["passes"], res)
        if res["passes"] in cals[4].schedules:
            add(f"calibrated at {pname}'s passes", res["passes"], ev(cals[4].config(res["passes"])))
    log(f"  evaluation runs: {ev.runs}")
    return rows, costs


def rules(names, steps_list, log, path):
    """Every member of the evenly spaced family at every pass count, on the evaluation set: the data
    the budget's spaced rule (warm-up length, steps left predicted at the end) is chosen from."""
    out = []
    for T in steps_list:
        for name in names:
            model = zoo.load(name)
            seeds, labels = eval_set(name, quick=False)
            ev = Evaluator(model, T, seeds, labels, seen=set(CAL_LABELS[name]))
            for K in levels(T):
                for sched in schedules.even_family(T, K):
                    res = ev(TCPadeConfig(schedule=sched, schedule_steps=T))
                    w = next(i for i in range(len(sched)) if sched[i] != i)
                    out.append(dict(model=name, steps=T, K=K, warmup=w, end=T - 1 - sched[-1], psnr=res["psnr"],
                                    schedule=" ".join(map(str, sched))))  # fmt: skip
                    log(f"  {name} T={T} K={K} w={w} e={T - 1 - sched[-1]} psnr={res['psnr']:.2f} [{out[-1]['schedule']}]")
                with open(path, "w", newline="") as f:
                    wr = csv.DictWriter(f, fieldnames=list(out[0]))
                    wr.writeheader()
                    wr.writerows(out)
    return out


def _page_header(out):
    """What an existing calibration_validation.md's header says after "tcpade at commit " (the
    validation run's commit and command, with any note on them), to the end of that line; or None."""
    import re

    path = os.path.join(out, "calibration_validation.md")
    if not os.path.exists(path):
        return None
    m = re.search(r"tcpade at commit (.+)$", open(path).read(), re.M)
    return m.group(1) if m else None


def read_validation(path):
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            r["steps"], r["passes"] = int(r["steps"]), int(r["passes"])
            for k in ("calibrated_db", "spaced_db", "margin_db", "per_t_db", "fraction_db", "end_db"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else ""
            out.append(r)
    return out


def read_rows(path):
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            for k in ("steps", "K"):
                r[k] = int(r[k])
            r["passes"] = int(r["passes"]) if r["passes"] else ""
            for k in ("speedup", "psnr", "ssim", "psnr_seen", "psnr_unseen"):
                r[k] = float(r[k]) if r[k] not in ("", "nan") else math.nan
            out.append(r)
    return out


# ----------------------------------------------------------------------------------------- report
def _fmt(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def search_section():
    """Greedy removal (exact and lazy) on flux-digits at 20 steps, from the earlier run whose rows are in
    calibration_search_flux20.csv (same calibration and evaluation inputs)."""
    path = os.path.join(OUT, "calibration_search_flux20.csv")
    if not os.path.exists(path):
        return []
    rows = read_rows(path)
    costs = json.load(open(os.path.join(OUT, "calibration_search_flux20_cost.json")))
    names = {"calibrated": "lazy greedy, 4 inputs", "calibrated greedy": "exact greedy, 4 inputs",
             "calibrated n=1": "lazy greedy, 1 input", "calibrated n=2": "lazy greedy, 2 inputs",
             "budget (spaced rule)": "spaced rule", "best evenly spaced": "best evenly spaced"}  # fmt: skip
    lines = ["", "## Greedy removal (exact and lazy) on flux-digits, 20 steps", "",
             "An earlier run of this script searched by greedy removal instead of refine (same calibration and "
             "evaluation inputs; `calibration_search_flux20.csv`). PSNR on the evaluation set:", "",
             "| passes | " + " | ".join(names.values()) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for K in sorted({r["K"] for r in rows if r["method"] == "calibrated"}, reverse=True):
        cells = [next((_fmt(r["psnr"]) for r in rows if r["K"] == K and r["method"] == m), "-") for m in names]
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    lines += ["", "Their cost (searching down to 6 passes, all counts on the way): "
              + "; ".join(f"{c['method']} on {c['inputs']} input(s): {c['runs']} runs, {c['calls']} calls, "
                          f"{c['minutes']:.2f} min" for c in costs) + "."]  # fmt: skip
    return lines


def rules_section():
    """How the spaced rule (and its variants: warm-up w, last e steps predicted) compares with the best
    member of the evenly spaced family, from calibration_rules.csv (``--rules``)."""
    path = os.path.join(OUT, "calibration_rules.csv")
    if not os.path.exists(path):
        return []
    tab, best = {}, {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["model"], int(r["steps"]), int(r["K"]))
            tab[key + (r["schedule"],)] = float(r["psnr"])
            best[key] = max(best.get(key, -math.inf), float(r["psnr"]))
    lines = ["", "## The spaced rule and its variants", "",
             "Every member of the evenly spaced family on the evaluation set (`calibration_rules.csv`, "
             + ", ".join(sorted({f"{m} T={t}" for m, t, _ in best})) + "); per rule: PSNR below the best member "
             "at the same passes, mean and worst over models and pass counts. w = steps 0..w-1 computed, "
             "e = the last e steps predicted; the budget's rule is w=%d, e=%d." % (schedules.SPACED_WARMUP,
                                                                                  schedules.SPACED_END), "",
             "| rule | mean deficit (dB) | worst deficit (dB) | cases |", "|---|---|---|---|"]  # fmt: skip
    for w in (2, 3):
        for e in (0, 1, 2):
            d = []
            for (m, t, k), b in best.items():
                v = tab.get((m, t, k, " ".join(map(str, schedules.spaced(t, k, 2, end=e, warmup=w)))))
                if v is not None:
                    d.append(b - v)
            if d:
                lines.append(f"| w={w}, e={e} | {sum(d) / len(d):.2f} | {max(d):.2f} | {len(d)} |")
    return lines


def report(rows, costs, meta, path):
    lines = [
        "# Calibrated schedules on the zoo: calibrated vs evenly spaced vs presets vs the best peer",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} torch thread(s); torch {meta['torch']}; {meta['date']}. "
        f"Command: `{meta['command']}`.",
        "",
        f"Held-out validation: the 4-input calibration is checked against the spaced rule on {HOLDOUT_SAMPLES[0]} "
        f"other inputs per model (seeds {HOLDOUT_SEED0}.., `tcpade.calibrate(..., holdout=...)`); the `calibrated` "
        "rows are what it ships: the searched schedule where it beat the spaced rule there, else the spaced rule's "
        "(bench/results/calibration_validation.md checks every shipped calibration).",
        "",
        "Calibration: `tcpade.calibrate` (method refine: the best evenly spaced schedule on the calibration "
        "inputs, then hill climbing, 2 sweeps at 20 steps, 1 at 50 and then searched again with 2 (--resweep 2), "
        "flux-photos 2 at both; rational predictor) at each pass count, on "
        "seeds 0-3 with labels "
        + ", ".join(f"{k}: {v}" for k, v in CAL_LABELS.items())
        + " against full computation of those inputs. Evaluation: bench/quality.py's evaluation set (seeds "
        "1000.., every class; none of the calibration inputs). PSNR (dB) against full computation of the same "
        "evaluation inputs. Best peer: the highest-PSNR peer row of bench/results/quality_<model>.csv (same "
        "evaluation inputs; MagCache calibrated on them) with at least the speedup T/K; `best evenly spaced` is "
        "the best of a family of evenly spaced schedules chosen on the evaluation set itself (an oracle for that "
        "family). Margin = calibrated - best peer; goal >= 2 dB. The peers have no point at exactly T/K: the best "
        "peer with at least that speedup may sit at a higher one (its speedup is shown). Peers: every group of "
        "bench/quality.py (FirstBlockCache, TaylorSeer per-module / whole-block / lite, MagCache calibrated on the "
        "evaluation inputs, cache-dit DBCache with TaylorSeer, DMD and FoCa, cache-dit's evenly spaced step masks, "
        "SeaCache on Wan), and here cache-dit's step mask fed the calibrated schedule's own steps (`cache-dit mask, "
        "same steps`: the best of its calibrators none / TaylorSeer / DMD / FoCa; its MAC speedup is below T/K "
        "because cache-dit still runs the first block on a masked step).",
    ]
    verdict, mask_verdict = [], []
    for name in dict.fromkeys(r["model"] for r in rows):
        for T in sorted({r["steps"] for r in rows if r["model"] == name}):
            rs = [r for r in rows if r["model"] == name and r["steps"] == T]
            lines += ["", f"## {name}, {T} steps", "",
                      "| passes (speedup) | calibrated | best evenly spaced | budget (spaced rule) | best peer | "
                      "cache-dit mask, same steps | margin over best peer | calibrated schedule |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for K in sorted({r["K"] for r in rs if r["method"] == "calibrated"}, reverse=True):
                get = {r["method"]: r for r in rs if r["K"] == K}
                c, e, sp, bp = (get.get(m) for m in ("calibrated", "best evenly spaced", "budget (spaced rule)", "best peer"))
                mk = get.get("cache-dit mask, same steps")
                if c is None or K * 2 > T or T / K > 10 / 3 + 1e-6:
                    continue
                # the margin is over the peers that reach this speedup; the mask fed the same steps runs more
                # (its first block on every masked step) and is judged apart (mask_verdict)
                margin = c["psnr"] - bp["psnr"] if bp else None
                if mk is not None:
                    mask_verdict.append((name, T, K, c["psnr"] - mk["psnr"], mk["speedup"]))
                ok = margin is not None and margin >= 2.0
                if bp is None:
                    verdict.append((name, T, K, None))
                else:
                    verdict.append((name, T, K, margin))
                peer = f"{bp['psnr']:.2f} ({bp['schedule']}, x{bp['speedup']:.2f})" if bp else "no peer reaches it"
                mask_cell = f"{mk['psnr']:.2f} ({mk['schedule']}, x{mk['speedup']:.2f})" if mk else "-"
                lines.append(f"| {K} (x{T / K:.2f}) | {_fmt(c['psnr'])} | {_fmt(e['psnr'] if e else None)} | "
                             f"{_fmt(sp['psnr'] if sp else None)} | {peer} | "
                             f"{mask_cell} | "
                             f"{(f'{margin:+.2f} dB ' + ('met' if ok else 'MISS')) if margin is not None else '-'} | "
                             f"{c['schedule']} |")  # fmt: skip
            pre = [r for r in rs if r["method"].startswith("preset") or r["method"].startswith("calibrated at")]
            if pre:
                lines += ["", "Presets at their own passes, and the calibrated schedule with the same passes:", "",
                          "| method | passes | PSNR | schedule |", "|---|---|---|---|"]  # fmt: skip
                lines += [f"| {r['method']} | {r['passes']} | {_fmt(r['psnr'])} | {r['schedule']} |" for r in pre]
            abl = [r for r in rs if r["method"].startswith("calibrated") and not r["method"].startswith("calibrated at")]
            if len({r["method"] for r in abl}) > 1:
                meths = sorted({r["method"] for r in abl})
                lines += ["", "Calibration inputs: 4 (2 sweeps) vs n = 1, 2 (the first of them, 1 sweep), evaluated on the "
                          "evaluation set:", "",
                          "| passes | " + " | ".join(meths) + " |", "|---" * (len(meths) + 1) + "|"]  # fmt: skip
                for K in sorted({r["K"] for r in abl}, reverse=True):
                    cells = [next((_fmt(r["psnr"]) for r in abl if r["K"] == K and r["method"] == m), "-") for m in meths]
                    lines.append(f"| {K} | " + " | ".join(cells) + " |")
            tr = [r for r in rs if r["method"] == "calibrated" and not math.isnan(r["psnr_unseen"])
                  and not math.isnan(r["psnr_seen"])]  # fmt: skip
            if tr:
                lines += ["", "Transfer (calibrated, 4 inputs): PSNR on evaluation samples of classes the calibration "
                          "saw vs classes it did not:", "", "| passes | seen classes | unseen classes |", "|---|---|---|"]  # fmt: skip
                lines += [f"| {r['K']} | {_fmt(r['psnr_seen'])} | {_fmt(r['psnr_unseen'])} |" for r in tr]
    lines += search_section()
    lines += rules_section()
    lines += ["", "## Cost of a calibration (this machine)", "",
              "| model | T | inputs | search | runs | block-stack calls | branches | minutes |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['model']} | {c['steps']} | {c['inputs']} | {c['method']} | {c['runs']} | {c['calls']} | "
              f"{c['branches']} | {c['minutes']:.2f} |" for c in costs]  # fmt: skip
    lines += ["", "Calls count every transformer call that computed the block stack (both CFG branches; the "
              "calibration inputs run as one batch). Skipped calls cost one memory pass each and are not counted. "
              "Minutes are wall time at 1 torch thread on a 2-core VM shared with other jobs (a load of 2-3 for "
              "flux-shapes and dit-photos, about 10 for the three older models, whose shipped calibrations are "
              "reported as recorded): an idle machine takes less; runs and calls are exact.", "",
              "## Goal: calibrated >= 2 dB over the best peer at every pass count from 2x to 3.3x", ""]  # fmt: skip
    for name, T, K, m in verdict:
        state = "no peer reaches this speedup" if m is None else (f"{m:+.2f} dB: met" if m >= 2 else f"{m:+.2f} dB: MISS")
        lines.append(f"- {name}, {T} steps, {K} passes (x{T / K:.2f}): {state}")
    met = sum(m is not None and m >= 2 for *_, m in verdict)
    lines += ["", f"Met at {met} of {len(verdict)} points.", "",
              "## Against cache-dit's step mask fed the same steps", "",
              "cache-dit's fixed step mask given the calibrated schedule's own steps (its best calibrator), on the same "
              "evaluation inputs. It computes the same steps, and on every masked step also the first block of the "
              "stack (cache-dit requires one), which on these small models is a large share of a pass, so it runs "
              "more MACs (its speedup below); on a full-size model with tens of blocks that share is a few per cent. "
              "Calibrated minus mask:", ""]  # fmt: skip
    for name, T, K, d, sp in mask_verdict:
        lines.append(f"- {name}, {T} steps, {K} passes (x{T / K:.2f}; the mask x{sp:.2f}): {d:+.2f} dB")
    if mask_verdict:
        ds = [d for *_, d, _ in mask_verdict]
        mean = sum(ds) / len(ds)
        lines += ["", f"Mean {mean:+.2f} dB, from {min(ds):+.2f} to {max(ds):+.2f} dB."
                  + (" Within 1 dB on average: the placement of the computed steps, not the predictor, carries most "
                     "of the lead, and a cache that takes a step mask can use a schedule found by `tcpade.calibrate` "
                     "too." if abs(mean) < 1.0 else "")]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def resweep(name, T, sweeps, log, add=()):
    """Search ``name``'s shipped calibration at T again (same calibration inputs, ``sweeps``
    hill-climbing sweeps; also the pass counts ``add``) and ship, per pass count, the schedule
    with the higher calibration PSNR (old or new: the same inputs measure both); the entry
    records the extra search."""
    import dataclasses

    from tcpade.tools.calibrate import save

    torch.manual_seed(0)
    old = tcpade.calibrate.shipped(name, T)
    if old is None:
        raise SystemExit(f"--resweep: no shipped calibration of {name} at {T} steps")
    ks = sorted(set(old.schedules) | set(add), reverse=True)
    schedules.clear(shipped=False)
    t0 = time.perf_counter()
    new = tcpade.calibrate(zoo.load(name), list(zip(CAL_SEEDS, CAL_LABELS[name])), passes=ks, steps=T,
                           method="refine", progress=False, sweeps=sweeps, holdout=False)  # fmt: skip
    sec = time.perf_counter() - t0
    sch, psnr, kept = {}, {}, []
    for k in ks:
        before = old.psnr.get(k, -math.inf)
        better = new.psnr[k] > before
        sch[k], psnr[k] = (new.schedules[k], new.psnr[k]) if better else (old.schedules[k], old.psnr[k])
        if not better:
            kept.append(k)
        log(f"  {name} T={T} K={k}: calibration PSNR old {before:.3f}, new {new.psnr[k]:.3f}: "
            f"{'new' if better else 'old'} shipped")  # fmt: skip
    extra = dict(old.extra, resweep=dict(sweeps=sweeps, runs=new.runs, calls=new.calls, seconds=round(sec, 1),
                                         kept_old=kept, added=sorted(set(add) - set(old.schedules))))  # fmt: skip
    merged = dataclasses.replace(old, schedules=sch, psnr=psnr, runs=old.runs + new.runs, calls=old.calls + new.calls,
                                 seconds=old.seconds + sec, extra=extra)  # fmt: skip
    # the schedules shipped are checked on the held-out inputs again (the old check is replaced)
    merged = tcpade.calibrate.validate(zoo.load(name), merged, holdout_inputs(name, HOLDOUT_SAMPLES[0]),
                                       progress=False)  # fmt: skip
    save(schedules.SHIPPED, merged)
    log(f"  resweep {name} T={T}: {new.runs} runs, {new.calls} calls, {sec / 60:.1f} min")


# ------------------------------------------------------------------------- held-out validation
VAL_FIELDS = ["kind", "model", "predictor", "steps", "passes", "calibrated_db", "spaced_db", "margin_db", "verdict",
              "schedule", "spaced_schedule", "source", "per_t_db", "per_t_schedule", "fraction_db",
              "fraction_schedule", "end_db", "end_schedule"]  # fmt: skip


def validate_shipped(names, steps_list, predictors, n, log):
    """Check every shipped calibration of ``names`` at ``steps_list`` for ``predictors`` on ``n``
    held-out inputs; write the checks into tcpade/zoo/schedules.json; return the rows."""
    from tcpade.tools.calibrate import save

    rows = []
    cals = tcpade.calibrate.load(schedules.SHIPPED, register=False)
    for name in names:
        model = zoo.load(name)
        held = holdout_inputs(name, n)
        for c in cals:
            if c.name != name or c.steps not in steps_list or c.predictor not in predictors:
                continue
            t0 = time.perf_counter()
            v = tcpade.calibrate.validate(model, c, held, progress=False)
            save(schedules.SHIPPED, v)  # one entry at a time: nothing is lost if the run stops
            log(f"  {name} {c.predictor} T={c.steps}: {v.validation_runs} runs, {v.validation_calls} calls, "
                f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            rows += entry_rows(v, name, log)
    return rows


def entry_rows(entry, name, log):
    """The validation rows of a checked calibration ``entry`` (one per pass count, most passes first);
    ``source`` names the search of each pass count's schedule (``extra["methods"]`` of a merged entry,
    else the entry's method)."""
    from tcpade.tools.calibrate import _spaced_plan

    rows, methods = [], entry.extra.get("methods") or {}
    for k in sorted(entry.schedules, reverse=True):
        cal_db, sp_db = entry.validation[k]
        search = methods.get(str(k), entry.method or "refine").split(",")[0]
        rows.append(dict(kind="shipped", model=name, predictor=entry.predictor, steps=entry.steps, passes=k,
                         calibrated_db=cal_db, spaced_db=sp_db, margin_db=cal_db - sp_db, verdict=entry.verdict(k),
                         schedule=" ".join(map(str, entry.schedules[k])),
                         spaced_schedule=" ".join(map(str, _spaced_plan(schedules.SPACED_PREDICTOR, k, entry.steps,
                                                                        {}, entry.extra.get("times")))),
                         source=f"calibrated at T={entry.steps}, {search}"))  # fmt: skip
        log(f"    {k:2d} passes: calibrated {cal_db:6.2f} dB, spaced rule {sp_db:6.2f} dB ({cal_db - sp_db:+.2f}): "
            f"{rows[-1]['verdict']} ({search})")  # fmt: skip
    return rows


def _shipped_points(names, steps_list, n):
    """(name, model, held-out inputs, T, the shipped entries of that model at T, their pass counts,
    most first) for every model of ``names`` and T of ``steps_list`` that has shipped calibrations."""
    shipped = tcpade.calibrate.load(schedules.SHIPPED, register=False)
    for name in names:
        model = zoo.load(name)
        held = holdout_inputs(name, n)
        for T in steps_list:
            here = [c for c in shipped if c.name == name and c.steps == T]
            ks = sorted({k for c in here for k in c.schedules}, reverse=True)
            if ks:
                yield name, model, held, T, here, ks


def _ship(new, here, log):
    """Ship the checked calibration ``new`` (``extra["methods"]`` naming its search per pass count):
    merged per pass count with the shipped entry of its predictor in ``here`` when that was checked
    on as many held-out inputs (``merge_by_holdout``), else as it is. Returns its validation rows."""
    from tcpade.tools.calibrate import save

    old = next((c for c in here if c.predictor == new.predictor), None)
    mergeable = old is not None and old.validated and old.holdout == new.holdout
    out = merge_by_holdout(old, new) if mergeable else new
    save(schedules.SHIPPED, out)  # one entry at a time: nothing is lost if the run stops
    log(f"  {new.name} {new.predictor} T={new.steps}: {new.runs} runs, {new.calls} calls, {new.seconds:.1f} s; "
        + ("merged with the shipped entry: " if mergeable else "")
        + " ".join(f"{k}:{out.extra['methods'][str(k)]}{'+' if out.used(k) else '-'}"
                   for k in sorted(new.schedules, reverse=True)))  # fmt: skip
    return entry_rows(out, new.name, log)


def trace_ship(names, steps_list, predictor, n, log):
    """Search ``predictor``'s schedules with the trace search (``method="trace"``: 20 runs up to 20
    steps, 40 above) on the calibration inputs of every model of ``names`` at ``steps_list``, at
    the pass counts its shipped calibrations have there, validate them on ``n`` held-out inputs
    and ship them: where the zoo already has an entry for the predictor, per pass count the
    schedule of the two with the higher held-out PSNR (both checked on the same inputs against the
    same spaced rule). Returns the validation rows of the entries written."""
    rows = []
    for name, model, held, T, here, ks in _shipped_points(names, steps_list, n):
        new = tcpade.calibrate(model, list(zip(CAL_SEEDS, CAL_LABELS[name])), passes=ks, steps=T,
                               predictor=predictor, method="trace", holdout=held, progress=False)  # fmt: skip
        new.name, new.extra = name, dict(new.extra, methods={str(k): "trace" for k in ks})
        rows += _ship(new, here, log)
    return rows


def spaced_ship(names, steps_list, predictors, n, log):
    """The predictor for the spaced rule, chosen on held-out inputs: for every model of ``names``
    at ``steps_list`` and every pass count its shipped calibrations have there, the spaced rule's
    own schedule run with each of ``predictors`` is checked on ``n`` held-out inputs against the
    spaced rule as the presets run it (with linear), and shipped as a calibrated schedule of that
    predictor (method "spaced rule": no search) where it has the higher held-out PSNR than the
    entry's own schedule; like every calibrated schedule, it is used only where it beats the
    spaced rule with linear there. Returns the validation rows of the entries written."""
    from tcpade.core.layout import MIN_HISTORY
    from tcpade.tools.calibrate import Calibration

    rows = []
    for name, model, held, T, here, ks in _shipped_points(names, steps_list, n):
        key = schedules.model_key(model.transformer)
        branches = 2 if model.spec.guidance_scale != 1 else 1
        for predictor in predictors:
            plain = Calibration(model=key, predictor=predictor, steps=T, passes=min(ks), name=name,
                                schedules={k: schedules.spaced(T, k, MIN_HISTORY[predictor]) for k in ks},
                                psnr={}, method="spaced rule", extra={"branches": branches})  # fmt: skip
            new = tcpade.calibrate.validate(model, plain, held, progress=False)
            new.extra["methods"] = {str(k): "spaced rule" for k in ks}
            rows += _ship(new, here, log)
    return rows


def merge_by_holdout(old, new):
    """One entry of ``old``'s and ``new``'s schedules (same model, predictor and T, both validated on
    the same held-out inputs): per pass count the one with the higher held-out PSNR (old on a tie);
    the cost is both searches' (what it takes to reproduce the entry)."""
    import dataclasses

    methods = dict(old.extra.get("methods") or {str(k): old.method for k in old.schedules})
    schedules_, psnr, validation = dict(old.schedules), dict(old.psnr), dict(old.validation)
    for k, steps in new.schedules.items():
        if k in old.validation and abs(old.validation[k][1] - new.validation[k][1]) > 0.01:
            raise SystemExit(f"{old.name} T={old.steps} {k} passes: the spaced rule's held-out PSNR differs between "
                             f"the shipped check ({old.validation[k][1]:.3f}) and the new one "
                             f"({new.validation[k][1]:.3f}): validate the shipped entry again first")  # fmt: skip
        if k not in old.schedules or new.validation[k][0] > old.validation.get(k, (-math.inf,))[0]:
            schedules_[k], validation[k], methods[str(k)] = steps, new.validation[k], new.method
            psnr.pop(k, None)
            if k in new.psnr:
                psnr[k] = new.psnr[k]
    used = sorted({m for m in methods.values()})
    return dataclasses.replace(
        old, schedules=schedules_, psnr=psnr, validation=validation, method=" + ".join(used),
        runs=old.runs + new.runs, calls=old.calls + new.calls, seconds=old.seconds + new.seconds,
        validation_runs=old.validation_runs + new.validation_runs,
        validation_calls=old.validation_calls + new.validation_calls,
        validation_seconds=old.validation_seconds + new.validation_seconds, extra=dict(old.extra, methods=methods))


def _carry_command(out):
    """The command (and commit) an existing calibration_validation.md names for its carried rows, or None."""
    path = os.path.join(out, "calibration_validation.md")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = re.search(r"^Command: `(.*?)\. The shipped rational 20-step calibration", f.read(), re.M)
    return m.group(1) if m else None


def write_validation(rows, meta, out):
    """calibration_validation.csv and .md from the rows (kind "shipped" and "carried")."""
    csv_path = os.path.join(out, "calibration_validation.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=VAL_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in VAL_FIELDS})
    shipped = [r for r in rows if r["kind"] == "shipped"]
    used = [r for r in shipped if r["verdict"] == "calibrated"]
    lost = [r for r in shipped if r["verdict"] != "calibrated"]
    same = [r for r in lost if r["schedule"] == r["spaced_schedule"]]
    lines = ["# Held-out validation of the shipped calibrations", "",
             f"Machine: {os.cpu_count()}-core VM ({meta['machine']}, shared with other jobs), torch {meta['torch']}, "
             f"{meta['threads']} thread(s); {meta['date']}; tcpade at commit "
             + (meta.get("header") or f"{meta['commit']}. Command: `{meta['command']}`."), "",
             f"Every entry of `tcpade/zoo/schedules.json` and every pass count in it: the calibrated schedule and the "
             f"spaced rule's schedule (`TCPadeConfig.budget(passes=K, use_calibrated=False).plan(T, times)`: on the "
             f"run's times, as the runtime places it) with the "
             f"predictor `slow()` / `fast()` run it with (`schedules.SPACED_PREDICTOR`: linear; the calibrated "
             f"schedule with the entry's predictor) on {meta['holdout']} held-out inputs per model (seeds {HOLDOUT_SEED0}.."
             f"{HOLDOUT_SEED0 + meta['holdout'] - 1}, labels 0, 1, .. in turn: neither the calibration search's seeds "
             "0-3 nor "
             "bench/quality.py's evaluation seeds 1000..), mean PSNR (dB) against full computation of the same inputs "
             "(`tcpade.calibrate.validate`). Verdict `calibrated`: strictly higher than the spaced rule, the presets "
             "use it; `spaced rule`: not higher, the entry keeps the schedule marked `\"used\": false` and the "
             "presets run the spaced rule at that pass count (a searched schedule that is the spaced rule's own "
             "counts as not used: the same schedule runs either way).", ""]  # fmt: skip
    search = lambda r: str(r.get("source", "")).split(", ")[-1] if ", " in str(r.get("source", "")) else "refine"  # noqa: E731
    traced = [r for r in shipped if search(r) == "trace"]
    if traced:
        cmd = meta.get("trace_command") or "python bench/calibration.py --trace-ship linear ...` (an earlier run)"
        lines += [f"The {len(traced)} rows whose search is `trace` come from `{cmd}: the trace search (one recorded "
                  "full run, an offline error table, 20 verification runs up to 20 steps, 40 above) on the same four "
                  "calibration inputs, checked on the same held-out inputs; where the entry had a schedule of its own "
                  "search, the one with the higher held-out PSNR is shipped per pass count.", ""]  # fmt: skip
    plain = [r for r in shipped if search(r) == "spaced rule"]
    if plain:
        cmd = meta.get("spaced_command") or "python bench/calibration.py --spaced-ship ...` (an earlier run)"
        lines += [f"The {len(plain)} rows whose search is `spaced rule` come from `{cmd}: no search, the spaced "
                  "rule's own "
                  "schedule run with the row's predictor, checked on the same held-out inputs against the spaced rule "
                  "with linear and shipped where it had the higher held-out PSNR than the entry's own schedule: the "
                  "predictor for the spaced rule, chosen on held-out inputs.", ""]  # fmt: skip
    if shipped:
        lines += [f"Pass counts checked: {len(shipped)}; calibrated schedule kept: {len(used)}; spaced rule instead: "
                  f"{len(lost)} (of which {len(same)} with the spaced rule's own schedule: a search that returned it, "
                  "or a predictor checked on it)."]
        losses = [r["margin_db"] for r in lost if r["schedule"] != r["spaced_schedule"]]
        if losses:
            lines[-1] += (f" Where a different schedule lost, it lost by {-max(losses):.2f} to {-min(losses):.2f} dB "
                          f"(mean {-sum(losses) / len(losses):.2f}).")  # fmt: skip
        gains = [r["margin_db"] for r in used]
        if gains:
            lines[-1] += f" Where it was kept it won by {min(gains):.2f} to {max(gains):.2f} dB."
        lines += ["", "| model | predictor | T | passes | calibrated (dB) | spaced rule (dB) | margin | verdict | "
                  "calibrated schedule | spaced-rule schedule | search |", "|---" * 11 + "|"]  # fmt: skip
        for r in shipped:
            lines.append(f"| {r['model']} | {r['predictor']} | {r['steps']} | {r['passes']} | "
                         f"{r['calibrated_db']:.2f} | {r['spaced_db']:.2f} | {r['margin_db']:+.2f} | {r['verdict']} | "
                         f"{r['schedule']} | {r['spaced_schedule']} | {search(r)} |")  # fmt: skip
    lines += carry_section(rows, meta)
    with open(os.path.join(out, "calibration_validation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def carry_runs(names, targets, n, log, source_T=20, predictor="rational"):
    """The shipped ``source_T``-step calibrations carried to each T of ``targets`` (at the pass counts of
    the shipped T calibration), against that per-T calibration and the spaced rule, on ``n`` held-out
    inputs. Rows of kind "carried"."""
    from tcpade import metrics
    from tcpade.tools.calibrate import _spaced_plan

    cals = tcpade.calibrate.load(schedules.SHIPPED, register=False)
    rows = []
    for name in names:
        model = zoo.load(name)
        held = holdout_inputs(name, n)
        seeds, labels = [s for s, _ in held], [c for _, c in held]
        src = next(c for c in cals if c.name == name and c.steps == source_T and c.predictor == predictor)
        for T in targets:
            per_t = next((c for c in cals if c.name == name and c.steps == T and c.predictor == predictor), None)
            if per_t is None:
                continue
            t0 = time.perf_counter()
            ref = model.sample(seeds, labels, steps=T)
            memo = {}

            def score(sched):
                if sched not in memo:
                    cfg = TCPadeConfig(predictor=predictor, schedule=tuple(sched), schedule_steps=T)
                    memo[sched] = float(metrics.psnr(model.sample(seeds, labels, steps=T, config=cfg), ref).mean())
                return memo[sched]

            src_times, times = zoo_times(model, source_T), zoo_times(model, T)  # the scheduler's timesteps
            for K in sorted(per_t.schedules, reverse=True):
                k0 = min(src.schedules, key=lambda k: (abs(k - K * source_T / T), -k))
                carried = schedules.carry(src.schedules[k0], src_times, times, passes=K,
                                          lead=schedules.K.MIN_HISTORY[predictor])  # fmt: skip
                frac = schedules.carry(src.schedules[k0], schedules.run_fraction(source_T), schedules.run_fraction(T),
                                       passes=K, lead=schedules.K.MIN_HISTORY[predictor])  # fmt: skip
                end = schedules.carry(src.schedules[k0], src_times, times, passes=K,
                                      lead=schedules.K.MIN_HISTORY[predictor], keep_end=True)  # fmt: skip
                spaced = _spaced_plan(predictor, K, T, {}, times)  # placed on the run's times, as it runs
                c_db, s_db, p_db, f_db = score(carried), score(spaced), score(per_t.schedules[K]), score(frac)
                e_db = score(end)
                row = dict(kind="carried", model=name, predictor=predictor, steps=T, passes=K, calibrated_db=c_db,
                           spaced_db=s_db, margin_db=c_db - s_db,
                           verdict="carried" if c_db > s_db else "spaced rule",
                           schedule=" ".join(map(str, carried)), spaced_schedule=" ".join(map(str, spaced)),
                           source=f"calibrated at T={source_T} ({k0} passes), carried", per_t_db=p_db,
                           per_t_schedule=" ".join(map(str, per_t.schedules[K])), fraction_db=f_db,
                           fraction_schedule=" ".join(map(str, frac)), end_db=e_db,
                           end_schedule=" ".join(map(str, end)))  # fmt: skip
                rows.append(row)
                log(f"    {name} T={T} K={K} (from {k0} of {source_T}): carried {c_db:6.2f}, run-fraction {f_db:6.2f}, "
                    f"end kept {e_db:6.2f}, per-T calibrated {p_db:6.2f}, spaced rule {s_db:6.2f} dB")  # fmt: skip
            log(f"  {name} T={T}: {len(memo) + 1} runs, {time.perf_counter() - t0:.1f} s")
    return rows


def carry_section(rows, meta):
    """The carried schedules' table (rows of kind "carried")."""
    rs = [r for r in rows if r["kind"] == "carried"]
    if not rs:
        return []
    win = [r for r in rs if r["margin_db"] > 0]
    vs_t = [r for r in rs if r["calibrated_db"] >= r["per_t_db"]]
    mean = sum(r["margin_db"] for r in rs) / len(rs)
    e_win = [r for r in rs if r["end_db"] > r["spaced_db"]]
    e_mean = sum(r["end_db"] - r["spaced_db"] for r in rs) / len(rs)
    t_win = [r for r in rs if r["per_t_db"] > r["spaced_db"]]
    lines = ["", "## One calibration, every step count: 20-step calibrations carried to 10, 28 and 50 steps", "",
             f"Command: `{meta['carry_command']}. The shipped rational 20-step calibration of "
             "each model carried to T' (`tcpade.policy.schedules.carry`: steps 0 and 1 kept, the others placed where "
             "the source places them on the scheduler's time axis, at the T' step whose timestep is nearest; the "
             "source's pass count is the 20-step one nearest to K * 20 / T', and the carried schedule follows its "
             "density to K passes), on the same held-out inputs as above, against the shipped calibration at T' "
             "(its searched schedule, validated or not) and the spaced rule (placed on the run's times, as the presets "
             "run it). `run fraction`: the same carry on each "
             "step's fraction of the run instead of the scheduler's times (what a plan can use before the run, "
             "without the scheduler). `end kept`: the scheduler's times, and as many final steps left predicted as "
             "the source leaves (`keep_end=True`). PSNR (dB) against full computation.", "",
             f"Carried beats the spaced rule at {len(win)} of {len(rs)} points (mean margin {mean:+.2f} dB, from "
             f"{min(r['margin_db'] for r in rs):+.2f} to {max(r['margin_db'] for r in rs):+.2f}); it matches or beats "
             f"the per-T calibration at {len(vs_t)} of {len(rs)}. With the end kept: beats the spaced rule at "
             f"{len(e_win)} of {len(rs)} (mean {e_mean:+.2f} dB). The per-T calibrations (searched at T', before "
             f"their validation) beat the spaced rule at {len(t_win)} of {len(rs)}.", "",
             "| model | T' | passes | source | carried | run fraction | end kept | per-T calibrated | spaced rule | "
             "carried - spaced | carried schedule | end-kept schedule |", "|---" * 12 + "|"]  # fmt: skip
    for r in rs:
        lines.append(f"| {r['model']} | {r['steps']} | {r['passes']} | {r['source']} | {r['calibrated_db']:.2f} | "
                     f"{r['fraction_db']:.2f} | {r['end_db']:.2f} | {r['per_t_db']:.2f} | {r['spaced_db']:.2f} | "
                     f"{r['margin_db']:+.2f} | {r['schedule']} | {r['end_schedule']} |")  # fmt: skip
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux-digits,wan-digits,dit-faces")
    p.add_argument("--steps", default="20,50")
    p.add_argument("--out", default=OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ship", action="store_true", help="do not write tcpade/zoo/schedules.json")
    p.add_argument("--ablate", default="flux-digits:20", help="model:T,..: also calibrate on 1 and 2 inputs there")
    p.add_argument("--lazy", default="", help="model:T,..: also run the lazy greedy search there")
    p.add_argument("--sweeps", default="20:2,50:1", help="T:sweeps,..: refine's hill-climbing sweeps (default 1)")
    p.add_argument("--reuse", action="store_true", help="evaluate the shipped 4-input calibrations (tcpade/zoo/"
                   "schedules.json) instead of searching again (their recorded cost is reported)")
    p.add_argument("--search-only", action="store_true", help="calibrate and ship, evaluate nothing")
    p.add_argument("--predictor", default="rational", help="with --search-only: search the schedules for this "
                   "predictor (shipped as its own entries, beside the rational ones)")
    p.add_argument("--peers", default=OUT, help="the folder of bench/quality.py's CSVs (default bench/results)")
    p.add_argument("--samples", type=int, default=16, help="evaluation samples per model: those of bench/quality.py's "
                   "run (its --samples), so that its peer rows are on the same inputs (default 16)")
    p.add_argument("--append", action="store_true", help="add to the rows of calibration.csv instead of replacing")
    p.add_argument("--report-only", action="store_true", help="re-render calibration.md from calibration.csv")
    p.add_argument("--refresh-peers", action="store_true", help="with --report-only: take the best-peer rows from the "
                   "quality CSVs (--peers) as they are now, into calibration.csv too")  # fmt: skip
    p.add_argument("--resweep", type=int, default=None, metavar="SWEEPS",
                   help="only: search the shipped calibrations of --models at --steps again with SWEEPS sweeps and "
                   "ship, per pass count, the better of the old and the new schedule by calibration PSNR")
    p.add_argument("--add-passes", default="", help="with --resweep: pass counts to search as well (K,K,..)")
    p.add_argument("--rules", action="store_true", help="only: every evenly spaced schedule of the family at every "
                   "pass count (calibration_rules.csv), to choose the spaced rule from")
    p.add_argument("--holdout-samples", type=int, default=16, help="held-out validation inputs per model (seeds "
                   f"{HOLDOUT_SEED0}..; default 16)")  # fmt: skip
    p.add_argument("--validate-shipped", action="store_true", help="only: check every shipped calibration of --models "
                   "at --steps on the held-out inputs, write the checks into tcpade/zoo/schedules.json and the table "
                   "into calibration_validation.md / .csv")  # fmt: skip
    p.add_argument("--predictors", default="rational,linear,reuse", help="with --validate-shipped: the predictors")
    p.add_argument("--spaced-ship", default=None, metavar="PREDICTOR,..", help="only: the spaced rule's schedule run "
                   "with each of these predictors, at the shipped pass counts of --models at --steps, checked on the "
                   "held-out inputs and shipped as that predictor's calibrated schedule where it beats the entry's own "
                   "schedule there (used only where it beats the spaced rule with linear)")  # fmt: skip
    p.add_argument("--trace-ship", default=None, metavar="PREDICTOR", help="only: search PREDICTOR's schedules with the "
                   "trace search at the shipped pass counts of --models at --steps, check them on the held-out inputs "
                   "and ship them (per pass count the better of the new and the shipped schedule of PREDICTOR on the "
                   "held-out inputs); their rows replace those entries' in calibration_validation.md / .csv")  # fmt: skip
    p.add_argument("--carry", default=None, metavar="T,..", help="only: the shipped 20-step rational calibrations of "
                   "--models carried to these step counts, against the per-T calibrations and the spaced rule on the "
                   "held-out inputs (added to calibration_validation.md / .csv)")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    HOLDOUT_SAMPLES[0] = args.holdout_samples
    PEERS_DIR[0] = args.peers
    if args.predictor != "rational" and not args.search_only:
        raise SystemExit("--predictor: only with --search-only (the evaluation compares rational calibrations)")
    PREDICTOR[0] = args.predictor
    meta = dict(machine=cpu_name(), threads=args.threads, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python bench/calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]))  # fmt: skip
    pairs = lambda arg: {(kv.split(":")[0], int(kv.split(":")[1])) for kv in arg.split(",") if kv}
    ablate, lazy = pairs(args.ablate), pairs(args.lazy)
    sweeps = {int(k): int(v) for k, v in (kv.split(":") for kv in args.sweeps.split(",") if kv)}
    rows, costs, shipped = [], [], []
    csv_path = os.path.join(args.out, "calibration.csv")
    cost_path = os.path.join(args.out, "calibration_cost.json")
    if (args.append or args.report_only) and not args.rules:  # keep the rows of an earlier run (other models / step counts)
        rows, costs = read_rows(csv_path), json.load(open(cost_path))
        meta["command"] += " (appended to the earlier run's rows)" if args.append else ""
    if args.validate_shipped or args.carry or args.trace_ship or args.spaced_ship:
        import subprocess

        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        meta.update(holdout=args.holdout_samples, commit=head.stdout.strip() or os.environ.get("TCPADE_COMMIT", "?"))
        schedules.clear(shipped=False)
        log = lambda m: print(m, flush=True)  # noqa: E731
        rows = []
        if args.validate_shipped:
            rows += validate_shipped(args.models.split(","), [int(x) for x in args.steps.split(",")],
                                     args.predictors.split(","), args.holdout_samples, log)  # fmt: skip
        if args.trace_ship:
            rows += trace_ship(args.models.split(","), [int(x) for x in args.steps.split(",")], args.trace_ship,
                               args.holdout_samples, log)  # fmt: skip
        if args.spaced_ship:
            rows += spaced_ship(args.models.split(","), [int(x) for x in args.steps.split(",")],
                                args.spaced_ship.split(","), args.holdout_samples, log)  # fmt: skip
        if args.carry:
            rows += carry_runs(args.models.split(","), [int(x) for x in args.carry.split(",")], args.holdout_samples,
                               log)  # fmt: skip
        keep = []
        path = os.path.join(args.out, "calibration_validation.csv")
        if (args.append or not args.validate_shipped) and os.path.exists(path):  # the rows of other runs stay
            done = {(r["kind"], r["model"], r["predictor"], r["steps"]) for r in rows}
            keep = [r for r in read_validation(path) if (r["kind"], r["model"], r["predictor"], r["steps"]) not in done]
        meta["carry_command"] = f"{meta['command']}` (tcpade at commit {meta['commit']})"
        if not args.carry:  # the carried rows are an earlier run's: keep the command the page names for them
            meta["carry_command"] = _carry_command(args.out) or "an earlier run`"
        if args.trace_ship:
            meta["trace_command"] = meta["carry_command"]
        if args.spaced_ship:
            meta["spaced_command"] = meta["carry_command"]
        if not args.validate_shipped:  # the page's header keeps the validation run's command and commit
            meta["header"] = _page_header(args.out)
        write_validation(keep + rows, meta, args.out)
        print(f"wrote {os.path.join(args.out, 'calibration_validation.md')}", flush=True)
        return
    if args.resweep is not None:
        for T in (int(x) for x in args.steps.split(",")):
            for name in args.models.split(","):
                resweep(name, T, args.resweep, lambda m: print(m, flush=True),
                        [int(k) for k in args.add_passes.split(",") if k])  # fmt: skip
        return
    if args.rules:
        rules(args.models.split(","), [int(x) for x in args.steps.split(",")], lambda m: print(m, flush=True),
              os.path.join(args.out, "calibration_rules.csv"))  # fmt: skip
        return
    if args.report_only:
        if args.refresh_peers:  # the best-peer rows from the quality CSVs as they are now
            for r in rows:
                if r["method"] == "best peer":
                    bp = best_peer(peers_from_csv(r["model"], r["steps"]), r["steps"], r["K"])
                    r.update(speedup=bp["speedup"], psnr=bp["psnr"], schedule=bp["label"])
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                for row in rows:
                    w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        report(rows, costs, meta, os.path.join(args.out, "calibration.md"))
        return
    schedules.clear(shipped=False)  # the evaluation must not pick up shipped schedules by accident
    for T in (int(s) for s in args.steps.split(",")):  # every model at the first T first
        for name in args.models.split(","):
            print(f"## {name} T={T}", flush=True)
            r, c = bench(name, T, lambda m: print(m, flush=True), shipped, (name, T) in ablate, (name, T) in lazy,
                         sweeps.get(T, 1), args.reuse, args.search_only, args.samples)  # fmt: skip
            schedules.clear(shipped=False)
            if args.search_only:
                if not args.no_ship:
                    from tcpade.tools.calibrate import save

                    save(schedules.SHIPPED, *shipped)
                continue
            # (--append: this run's rows replace those of the same model and T)
            rows = [x for x in rows if (x["model"], int(x["steps"])) != (name, T)] + r
            costs = [x for x in costs if (x["model"], int(x["steps"])) != (name, T)] + c
            keys = list(rows[0])
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
                w.writeheader()
                for row in rows:
                    w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
            with open(cost_path, "w") as f:
                json.dump(costs, f, indent=1)
            report(rows, costs, meta, os.path.join(args.out, "calibration.md"))
            if not args.no_ship:
                from tcpade.tools.calibrate import save

                save(schedules.SHIPPED, *shipped)
    print(f"wrote {os.path.join(args.out, 'calibration.md')}", flush=True)


if __name__ == "__main__":
    main()
