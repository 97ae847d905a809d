"""The trace search (tcpade.tools.trace_search) against refine and the spaced rule, on held-out inputs.

    python bench/calibration_trace.py                                   # three zoo models, 20 and 50 steps
    python bench/calibration_trace.py --models flux-shapes --steps 20 --append
    python bench/calibration_trace.py --report                          # the page from the CSV alone

For each zoo model and step count T, at the pass counts 9, 8, 7, 6 (T = 20) or 20, 17, 12 (T = 50):

* trace: one full-computation run of the calibration inputs that also records every residual,
  the offline error table, the DP's candidates, then real runs, at most --budget runs in all
  (the full computation included), through the same runner, execute and score as
  ``tcpade.calibrate`` (``tcpade.tools.calibrate._runner``);
* refine: ``tcpade.calibrate(model, inputs, passes=..., steps=T, method="refine", sweeps=...)``;
* the spaced rule (``tcpade.policy.schedules.spaced``).

Calibration inputs: seeds 0..3 with bench/calibration.py's labels (one batch of 4). Held-out
inputs: seeds 6000.. with the classes in turn (--samples), disjoint from the calibration inputs
and from bench/quality.py's evaluation seeds (1000..). PSNR (dB, data range 2) of each schedule's
images against full computation of the same held-out inputs. Share = (trace - spaced) /
(refine - spaced) on the held-out inputs, where refine gains over the spaced rule.

Writes bench/results/calibration_trace.csv (one row per model, T, pass count; --append keeps the
other models' rows) and calibration_trace.md.
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import torch
from calibration import CAL_LABELS, CAL_SEEDS

import tcpade
from tcpade import metrics, zoo
from tcpade.policy import schedules as S
from tcpade.policy.config import TCPadeConfig
from tcpade.tools import trace_search as TS
from tcpade.tools.calibrate import _runner
from tcpade.tools.runner import ZooRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")
CSV = os.path.join(OUT, "calibration_trace.csv")
MD = os.path.join(OUT, "calibration_trace.md")
PASSES = {20: [9, 8, 7, 6], 50: [20, 17, 12]}
BUDGET = {20: 20, 50: 40}
HELD_OUT_SEED = 6000
MIN_GAIN = 0.01  # dB: a smaller gain of refine over the spaced rule counts as none (no share shown)
FIELDS = ["model", "steps", "passes", "spaced", "refine", "trace", "share", "refine_cal", "trace_cal", "spaced_cal",
          "refine_sched", "trace_sched", "trace_runs", "trace_calls", "trace_s", "refine_runs", "refine_calls",
          "refine_s", "refine_sweeps", "budget", "samples", "commit"]  # fmt: skip


@functools.lru_cache(maxsize=1)
def library() -> str:
    """A hash of the library's sources other than the trace search itself (what refine's result
    depends on), taken once, when the script starts (the code it runs is loaded then): the refine
    cache's key and the report's sections."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "tcpade", "**", "*.py"), recursive=True)):
        if not path.endswith(os.path.join("tools", "trace_search.py")):
            with open(path, "rb") as f:
                h.update(path.encode() + f.read())
    return h.hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """HEAD and the library's hash when the script started."""

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "tcpade")
    head = git("rev-parse", "--short", "HEAD")
    return f"{head}, library {library()}" + (" (uncommitted changes in tcpade/)" if dirty else "")


def trace_calibration(model, inputs, steps, passes, budget, predictor="rational", candidates=2):
    """The trace search as calibrate() would run it: (schedules, calibration PSNR, runs, calls,
    seconds, search log)."""
    from tcpade.core.layout import MIN_HISTORY

    runner, data_range = _runner(model, inputs, steps, None)
    counters = dict(runs=0, calls=0)

    def execute(sched):
        cfg = TCPadeConfig(predictor=predictor, schedule=tuple(sched), schedule_steps=steps)
        run = runner.run(cfg)
        counters["runs"] += 1
        counters["calls"] += run.calls
        return run.outputs, run.branches

    t0 = time.perf_counter()
    with TS.Recorder() as rec:
        ref, _ = execute(range(steps))

    def score(sched):
        out, _ = execute(sched)
        return float(metrics.psnr(out, ref, data_range=data_range).mean())

    log = TS.Log()
    path, curve = TS.search_runner(runner, score, steps, passes, MIN_HISTORY[predictor], predictor, rec.trace(steps),
                                   budget, counters["runs"], log=log, candidates=candidates)  # fmt: skip
    return path, curve, counters["runs"], counters["calls"], time.perf_counter() - t0, log


def refine(model, name, cal, T, ks, sweeps):
    """tcpade.calibrate's refine search; with --refine-cache, kept in that JSON file per model, T,
    sweeps and commit (the trace search can then be measured again without running refine again)."""
    key = f"{name}|{T}|{sweeps}|{library()}"
    cache = {}
    if REFINE_CACHE[0] and os.path.exists(REFINE_CACHE[0]):
        with open(REFINE_CACHE[0]) as f:
            cache = json.load(f)
    if key in cache:
        print("   (refine from the cache)", flush=True)
        return tcpade.calibrate.Calibration.from_json(cache[key])
    r = tcpade.calibrate(model, cal, passes=ks, steps=T, method="refine", progress=False, sweeps=sweeps)
    if REFINE_CACHE[0]:
        cache[key] = r.to_json()
        with open(REFINE_CACHE[0], "w") as f:
            json.dump(cache, f)
    return r


REFINE_CACHE = [None]


def held_out(name, samples):
    n = zoo.SPECS[name].num_classes
    return [HELD_OUT_SEED + i for i in range(samples)], [i % n for i in range(samples)]


def bench(name, T, samples, sweeps, budget, rows_out, candidates=2):
    model = zoo.load(name)
    ks = PASSES[T]
    cal = list(zip(CAL_SEEDS, CAL_LABELS[name]))
    print(f"== {name} T={T}: trace search (budget {budget} runs)", flush=True)
    t_path, t_curve, t_runs, t_calls, t_s, log = trace_calibration(model, cal, T, ks, budget, candidates=candidates)
    for k, s, v, c, why in log.rows:
        print(f"   {k:3d} {why:8s} {v:7.2f} dB  offline {c:.3g}  {' '.join(map(str, s))}", flush=True)
    print(f"   trace: {t_runs} runs, {t_calls} calls, {t_s:.1f} s", flush=True)
    print(f"== {name} T={T}: refine ({sweeps} sweep(s))", flush=True)
    r = refine(model, name, cal, T, ks, sweeps)
    print(f"   refine: {r.runs} runs, {r.calls} calls, {r.seconds:.1f} s", flush=True)
    seeds, labels = held_out(name, samples)
    ev = ZooRunner(model, seeds, labels, T)
    full = ev.run(TCPadeConfig(schedule=tuple(range(T)), schedule_steps=T)).outputs

    def psnr(sched):
        out = ev.run(TCPadeConfig(schedule=tuple(sched), schedule_steps=T)).outputs
        return float(metrics.psnr(out, full, data_range=2.0).mean())

    spaced_cal = {k: v for k, s, v, c, why in log.rows if why == "spaced"}
    for k in ks:
        sp = S.spaced(T, k, 2)
        v = {"spaced": psnr(sp), "refine": psnr(r.schedules[k]), "trace": psnr(t_path[k])}
        gain = v["refine"] - v["spaced"]
        share = (v["trace"] - v["spaced"]) / gain if gain > 0 else float("nan")
        row = dict(model=name, steps=T, passes=k, **{n: round(x, 3) for n, x in v.items()},
                   share=round(share, 3), refine_cal=round(r.psnr[k], 3), trace_cal=round(t_curve[k], 3),
                   spaced_cal=round(spaced_cal.get(k, float("nan")), 3),
                   refine_sched=" ".join(map(str, r.schedules[k])), trace_sched=" ".join(map(str, t_path[k])),
                   trace_runs=t_runs, trace_calls=t_calls, trace_s=round(t_s, 1), refine_runs=r.runs,
                   refine_calls=r.calls, refine_s=round(r.seconds, 1), refine_sweeps=sweeps, budget=budget,
                   samples=samples, commit=commit())  # fmt: skip
        print(f"   {k:3d} passes held-out: spaced {v['spaced']:.2f}  refine {v['refine']:.2f}  trace {v['trace']:.2f}"
              f"  share {share:.2f}", flush=True)  # fmt: skip
        rows_out.append(row)


def read_rows():
    if not os.path.exists(CSV):
        return []
    with open(CSV) as f:
        return list(csv.DictReader(f))


def write_csv(rows):
    with open(CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def verdict(r) -> str:
    sp, rf, tr = float(r["spaced"]), float(r["refine"]), float(r["trace"])
    if rf - sp >= MIN_GAIN:
        return "met" if (tr - sp) >= 0.9 * (rf - sp) else "MISS"
    return "met" if tr >= rf else "MISS"  # refine gained nothing: trace must not fall below it


def report(rows, command, note=""):
    libs = list(dict.fromkeys(lib_of(r) for r in rows))
    lines = ["# Trace search vs refine vs the spaced rule, on held-out inputs", "",
             "Machine: 2-core Intel Xeon VM, torch 2.13.0+cpu, 1 thread (shared with other jobs: seconds are "
             f"indicative). Command: `{command}`. One section per state of the library the numbers were measured "
             "at (a hash of tcpade/'s sources other than the trace search), newest last.", ""]  # fmt: skip
    if note:
        lines += [note, ""]
    for lib in libs:
        part = [r for r in rows if lib_of(r) == lib]
        lines += section(part, "; ".join(dict.fromkeys(r["commit"] for r in part)))
    with open(MD, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {MD}")


def lib_of(row) -> str:
    return row["commit"].split("library ")[-1][:8]


def section(rows, commit_id):
    rows = sorted(rows, key=lambda r: (r["model"], int(r["steps"]), -int(r["passes"])))
    lines = [f"## At commit {commit_id}", "",
             "Calibration inputs: seeds 0..3 with bench/calibration.py's labels, one batch of 4. Held-out inputs: "
             f"seeds {HELD_OUT_SEED}.. with the classes in turn (samples per row below), seen by neither search. "
             "PSNR (dB) against full computation of the same inputs. `trace`: tcpade.tools.trace_search (one recorded "
             "full run, offline error table, DP candidates, then real runs), at most the budget in runs, the "
             "full-computation run included. `refine`: tcpade.calibrate(method=\"refine\"). Share: (trace - spaced) / "
             "(refine - spaced) on the held-out inputs; goal >= 0.9 (where refine gains less than 0.01 dB over "
             "the spaced rule, no share and the goal is trace >= refine). Costs are for the whole step count (all its "
             "pass counts together).", "",
             "| model | T | passes | spaced | refine | trace | share | goal | cal. PSNR spaced / refine / trace "
             "| refine schedule | trace schedule |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sh = float(r["share"]) if float(r["refine"]) - float(r["spaced"]) >= MIN_GAIN else float("nan")
        lines.append(f"| {r['model']} | {r['steps']} | {r['passes']} | {float(r['spaced']):.2f} | "
                     f"{float(r['refine']):.2f} | {float(r['trace']):.2f} | {'n/a' if sh != sh else f'{sh:.2f}'} | "
                     f"{verdict(r)} | {float(r['spaced_cal']):.2f} / {float(r['refine_cal']):.2f} / "
                     f"{float(r['trace_cal']):.2f} | {r['refine_sched']} | {r['trace_sched']} |")  # fmt: skip
    lines += ["", "Cost per model and step count (runs: sampling runs of the 4 calibration inputs; calls: block-stack "
              "calls, every branch):", "",
              "| model | T | trace runs (budget) | trace calls | trace s | refine runs (sweeps) | refine calls | "
              "refine s | held-out samples |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for r in rows:
        key = (r["model"], r["steps"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['model']} | {r['steps']} | {r['trace_runs']} ({r['budget']}) | {r['trace_calls']} | "
                     f"{r['trace_s']} | {r['refine_runs']} ({r['refine_sweeps']}) | {r['refine_calls']} | "
                     f"{r['refine_s']} | {r['samples']} |")  # fmt: skip
    gains = [(float(r["trace"]) - float(r["spaced"]), float(r["refine"]) - float(r["spaced"])) for r in rows]
    tot_t, tot_r = sum(g[0] for g in gains), sum(g[1] for g in gains)
    misses = [r for r in rows if verdict(r) == "MISS"]
    lines += ["", f"Over all {len(rows)} points: trace gains {tot_t:+.2f} dB over the spaced rule in sum, refine "
              f"{tot_r:+.2f} dB" + (f" (share of the summed gain {tot_t / tot_r:.2f})." if tot_r > 0 else "."), "",
              f"Misses ({len(misses)}):" if misses else "Misses: none."]  # fmt: skip
    for r in misses:
        lines.append(f"- {r['model']} T={r['steps']} {r['passes']} passes: spaced {float(r['spaced']):.2f}, refine "
                     f"{float(r['refine']):.2f}, trace {float(r['trace']):.2f} dB")  # fmt: skip
    return lines + [""]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux-photos,flux-shapes,dit-photos")
    p.add_argument("--steps", default="20,50")
    p.add_argument("--samples", type=int, default=12, help="held-out samples per model (default 12)")
    p.add_argument("--sweeps", default="20:2,50:2", help="refine's sweeps per T (default 2 at both)")
    p.add_argument("--append", action="store_true", help="keep the CSV's rows of other (model, T)")
    p.add_argument("--report", action="store_true", help="only write the page from the CSV")
    p.add_argument("--command", default=None, help="the command line the page names (default: this one)")
    p.add_argument("--candidates", type=int, default=2, help="the trace search's DP candidates per table (default 2)")
    p.add_argument("--note", default="", help="a paragraph the page adds under its header (e.g. which commits)")
    p.add_argument("--refine-cache", default=None, help="a JSON file keeping refine's results per model, T, sweeps "
                   "and commit (default: none)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    commit()  # the library's state now, before a model loads
    REFINE_CACHE[0] = args.refine_cache
    command = args.command or "python " + " ".join(["bench/calibration_trace.py", *sys.argv[1:]])
    rows = read_rows() if (args.append or args.report) else []
    if not args.report:
        sweeps = {int(a): int(b) for a, b in (x.split(":") for x in args.sweeps.split(","))}
        for T in (int(x) for x in args.steps.split(",")):
            for name in args.models.split(","):
                new = []
                bench(name, T, args.samples, sweeps.get(T, 2), BUDGET[T], new, args.candidates)
                rows = [r for r in rows if (r["model"], int(r["steps"]), lib_of(r)) != (name, T, library())]
                rows += new
                write_csv(rows)
    print(platform.processor() or platform.machine())
    report(rows, command, args.note)


if __name__ == "__main__":
    main()
