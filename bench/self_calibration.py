"""A model nobody calibrated, calibrated by its user: the cheap trace search on a few inputs of
their own, judged on inputs it did not see, against the best peer.

For each zoo model (treated as new: its shipped schedules are not used) and step count T:

1. ``tcpade.calibrate(model, inputs, passes=<the benchmark levels' pass counts>, steps=T,
   predictor="linear", method="trace", holdout=0.5)`` on INPUTS user inputs (seeds 2000.., the
   classes in turn; half searched, half held out to check each schedule against the spaced rule),
   with the trace search's default budget (20 sampling runs up to 20 steps, 40 above, the held-out
   check on top). Its cost is recorded (runs, block-stack calls of every branch, seconds).
2. At each benchmark level (2x, 2.5x, 2.9x; 3x and 4x at 50 steps) with K = passes_at(T, level),
   the schedule a user then runs: the calibrated one where it won its held-out check
   (``Calibration.used``), else the spaced rule; predictor linear (the uncalibrated default),
   ``TCPadeConfig(predictor="linear", schedule=..., schedule_steps=T)``.
3. PSNR against full computation on bench/quality.py's evaluation inputs (seeds 1000.., 16
   samples; wan-digits 10; none of them seen by the calibration), beside the spaced rule's own run
   on them and the best peer of bench/results/quality_<model>.csv at that level (every peer swept
   over its knobs on those same inputs). Margin = used - best peer; goal >= 2 dB.

    python bench/self_calibration.py [--models M1,M2] [--steps 10,20,28,50] [--inputs 8] [--append]
    python bench/self_calibration.py --report-only   # self_calibration.md from the CSV
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import torch
from _bench_common import cpu_name, zoo_times  # noqa: E402
from defaults import best_peers, passes_at  # noqa: E402
from peers import levels  # noqa: E402
from quality import eval_set  # noqa: E402

import tcpade  # noqa: E402
from tcpade import zoo  # noqa: E402
from tcpade.policy import schedules as S  # noqa: E402
from tcpade.policy.config import TCPadeConfig  # noqa: E402
from tcpade.tools import metrics  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_NAME, MD_NAME = "self_calibration.csv", "self_calibration.md"
USER_SEED0 = 2000
GOAL_DB = 2.0
FIELDS = ["model", "steps", "level", "tag", "preset", "passes", "verdict", "heldout_cal", "heldout_spaced",
          "schedule", "psnr", "psnr_spaced", "peer", "peer_label", "margin", "cal_runs", "cal_calls", "cal_seconds",
          "cal_inputs"]  # fmt: skip


def user_inputs(name: str, n: int):
    classes = zoo.SPECS[name].num_classes
    return [(USER_SEED0 + i, i % classes) for i in range(n)]


PRESET_AT = {
    "2x": ("slow(speedup=2)", lambda: TCPadeConfig.slow(speedup=2.0)),
    "2.5x": ("slow", TCPadeConfig.slow),
    "2.9x": ("fast", TCPadeConfig.fast),
}


def config_at(tag: str, passes: int, steps: int):
    """The preset that sits at the level (bench/quality.py's PRESETS); at 3x and 4x ``fast()`` with the
    level's pass count (``fast(passes=16)`` / ``fast(passes=12)`` at 50 steps; an explicit count is
    kept, and where it is too few for the 3-in-a-row guard the rule is placed without the cut)."""
    if tag in PRESET_AT:
        return PRESET_AT[tag]
    return f"fast(passes={passes})", lambda: TCPadeConfig.fast(passes=passes)


def run(models, steps_list, n_inputs, path, append):
    peers = best_peers(models)
    mode = "a" if append and os.path.exists(path) else "w"
    S.clear(shipped=False)  # every model is new: the zoo's shipped schedules stay out
    try:
        with open(path, mode, newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if mode == "w":
                w.writeheader()
            for name in models:
                torch.manual_seed(0)
                m = zoo.load(name)
                seeds, labels = eval_set(name, False, 16)
                for T in steps_list:
                    _one(w, f, m, name, T, seeds, labels, n_inputs, peers)
    finally:
        S.clear(shipped=True)


def _one(w, f, m, name, T, seeds, labels, n_inputs, peers):
    lv = levels(T)
    ks = sorted({passes_at(T, level) for level, _ in lv}, reverse=True)
    t0 = time.perf_counter()
    cal = tcpade.calibrate(m, user_inputs(name, n_inputs), passes=ks, steps=T, predictor="linear",
                           method="trace", holdout=0.5, progress=False)  # fmt: skip
    cal.register()  # what a user does next: the presets take the schedules that won their check
    print(f"{name} T={T}: calibrated in {time.perf_counter() - t0:.0f} s ({cal.runs} runs, {cal.calls} calls)",
          flush=True)  # fmt: skip
    ref = m.sample(seeds, labels, steps=T)
    times = zoo_times(m, T)  # the run's times, which the spaced rule is placed on
    for level, tag in lv:
        k = passes_at(T, level)
        label, make = config_at(tag, k, T)
        cfg = make()
        images, summ = m.sample(seeds, labels, steps=T, config=cfg, return_summary=True)
        used = tuple(summ.computed("cond"))
        if len(used) != k or (T / len(used)) < level * (1 - 1e-3):
            raise RuntimeError(f"{name} T={T}: {label} computed {len(used)} steps, not the {k} of the {tag} level")
        expect = tuple(cal.schedule(k))  # the searched schedule where it won its check, else the spaced rule
        if used != expect:
            raise RuntimeError(f"{name} T={T} {label}: ran {used}, the calibration gives {expect}")
        # what the same config computes uncalibrated: the spaced rule on the run's times (cut to 3 predicted
        # steps in a row under fast()'s guard where the count can keep that)
        base = tuple(dataclasses.replace(cfg, use_calibrated=False).plan(T, times))
        spaced_cfg = TCPadeConfig(predictor="linear", schedule=base, schedule_steps=T)
        p = float(metrics.psnr(images, ref).mean())
        ps = p if used == base else float(metrics.psnr(m.sample(seeds, labels, steps=T, config=spaced_cfg), ref).mean())
        peer, plabel = peers[(name, T, round(level, 4))]
        mine, sp = cal.validation.get(k, (float("nan"), float("nan")))
        row = dict(model=name, steps=T, level=round(level, 4), tag=tag, preset=label, passes=k,
                   verdict=cal.verdict(k), heldout_cal=round(mine, 4), heldout_spaced=round(sp, 4),
                   schedule=" ".join(map(str, used)), psnr=round(p, 4), psnr_spaced=round(ps, 4), peer=peer,
                   peer_label=plabel, margin=round(p - peer, 4), cal_runs=cal.runs, cal_calls=cal.calls,
                   cal_seconds=round(cal.seconds, 1), cal_inputs=n_inputs)  # fmt: skip
        w.writerow(row)
        f.flush()
        print(
            f"  {tag} {label}: K={k} {row['verdict']}: {p:.2f} dB (spaced {ps:.2f}), peer {peer:.2f}, "
            f"margin {p - peer:+.2f}",
            flush=True,
        )


TAGS = ["2x", "2.5x", "2.9x", "3x", "4x"]
INTRO = (
    "Each zoo model is treated as new (the zoo's shipped schedules are not used): `tcpade.calibrate(model, inputs, "
    'passes=..., steps=T, predictor="linear", method="trace", holdout=0.5)` on 8 inputs of its own (seeds '
    "2000.., half searched, half held out), the trace search's default budget (20 sampling runs of the 4 search "
    "inputs up to 20 steps, 40 above, the held-out check on top), `cal.register()`, then the preset at the level as "
    "a user takes it (`slow(speedup=2)`, `slow()`, `fast()`; at 3x `fast(passes=16)`, at 4x "
    "`fast(passes=12)`): "
    "the searched schedule where it won its held-out check, else the spaced rule (placed on the run's times, "
    "`time_spacing` 0.5, as an uncalibrated run computes it). PSNR (dB) against full computation "
    "on bench/quality.py's evaluation inputs (seeds 1000.., 16 samples, wan-digits 10; not seen by the "
    "calibration); best peer: every peer of quality_<model>.csv swept over its knobs on those same inputs, the best "
    "that reaches the level."
)


def margin_lines(rows):
    """The margin table (model x step count x level) of the CSV rows, and (met, total, gains)."""
    lines = ["| model | steps | calibration cost | " + " | ".join(TAGS) + " |", "|---|---|---|" + "---|" * len(TAGS)]
    met = total = 0
    gains = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for T in sorted({int(r["steps"]) for r in rows if r["model"] == name}):
            rs = {r["tag"]: r for r in rows if r["model"] == name and int(r["steps"]) == T}
            one = next(iter(rs.values()))
            cost = f"{one['cal_runs']} runs, {one['cal_calls']} calls, {float(one['cal_seconds']):.0f} s"
            cells = []
            for t in TAGS:
                r = rs.get(t)
                if r is None:
                    cells.append("")
                    continue
                mg, ms = float(r["margin"]), float(r["psnr_spaced"]) - float(r["peer"])
                total += 1
                met += mg >= GOAL_DB
                gains.append(float(r["psnr"]) - float(r["psnr_spaced"]))
                cell = f"{mg:+.2f}{'' if r['verdict'] == 'calibrated' else ' s'} ({ms:+.2f})"
                cells.append(cell if mg >= GOAL_DB else f"**{cell}**")
            lines.append(f"| {name} | {T} | {cost} | " + " | ".join(cells) + " |")
    return lines, met, total, gains


def totals_line(rows, met, total, gains):
    n_cal = sum(r["verdict"] == "calibrated" for r in rows)
    return (
        f"Goal met at {met} of {total} points; {total - met} misses. In brackets: the spaced rule's own margin "
        f"(no calibration); `s`: the searched schedule did not win its held-out check, so the spaced rule ran "
        f"({total - n_cal} of {total}). On the evaluation inputs the calibration gained {sum(gains):+.2f} dB over "
        f"the spaced rule in sum (per point: mean {sum(gains) / max(1, len(gains)):+.2f}, best {max(gains):+.2f}, "
        f"worst {min(gains):+.2f}; it lost more than 0.1 dB at {sum(g < -0.1 for g in gains)} points)."
    )


def report(path, md):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    table, met, total, gains = margin_lines(rows)
    lines = [
        "# A model nobody calibrated, calibrated by its user in 25-50 runs",
        "",
        f"Generated by `python bench/self_calibration.py --report-only` from {CSV_NAME} (the runs: "
        "`python bench/self_calibration.py`; machine and times below). " + INTRO + f" Goal: >= {GOAL_DB:g} dB "
        "over the best peer. Calibration cost: sampling runs of the 4 search or 4 held-out inputs (held-out "
        "check included), block-stack calls of every CFG branch, seconds on this machine.",
        "",
        f"## Margin over the best peer (dB; **bold: a miss**, under {GOAL_DB:g} dB)",
        "",
    ] + table + ["", totals_line(rows, met, total, gains), "", "## Every point", "",
                 "| model | steps | level | preset | passes | held-out check (searched / spaced) | verdict | schedule "
                 "| PSNR | spaced rule | best peer | margin |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['tag']} | `{r['preset']}` | {r['passes']} | "
                     f"{float(r['heldout_cal']):.2f} / {float(r['heldout_spaced']):.2f} | {r['verdict']} | "
                     f"{r['schedule']} | {float(r['psnr']):.2f} | {float(r['psnr_spaced']):.2f} | "
                     f"{float(r['peer']):.2f} ({r['peer_label']}) | {float(r['margin']):+.2f} |")  # fmt: skip
    meta = os.path.join(os.path.dirname(path), "self_calibration_meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        cmds = "; ".join(f"`{c}`" for c in m["commands"])
        lines += ["", f"Machine: {m['machine']}, 1 torch thread; torch {m['torch']}, diffusers {m['diffusers']}; "
                  f"{m['date']}, tcpade at commit {m['commit']}. Commands: {cmds}."]  # fmt: skip
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return met, total


def write_meta(out: str, command: str, append: bool) -> None:
    """self_calibration_meta.json: the machine, versions, commit and the commands behind the CSV."""
    import subprocess

    import diffusers

    path = os.path.join(out, "self_calibration_meta.json")
    old = {}
    if append and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    meta = dict(machine=cpu_name(), torch=torch.__version__, diffusers=diffusers.__version__,
                date=time.strftime("%Y-%m-%d"), commit=commit.stdout.strip() or "?",
                commands=old.get("commands", []) + [command])  # fmt: skip
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(zoo.names()))
    ap.add_argument("--steps", default="10,20,28,50")
    ap.add_argument("--inputs", type=int, default=8, help="user inputs (half searched, half held out)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--append", action="store_true", help="add rows to the CSV instead of replacing it")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    path, md = os.path.join(a.out, CSV_NAME), os.path.join(a.out, MD_NAME)
    if not a.report_only:
        if a.inputs < 2:
            ap.error(f"--inputs must be >= 2 (half are held out), got {a.inputs}")
        torch.set_num_threads(1)
        print(f"{cpu_name()}, torch {torch.__version__}", flush=True)
        run([x for x in a.models.split(",") if x], [int(x) for x in a.steps.split(",")], a.inputs, path, a.append)
        write_meta(a.out, "python bench/self_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   a.append)  # fmt: skip
    met, total = report(path, md)
    print(f"goal met at {met} of {total} points -> {md}")


if __name__ == "__main__":
    main()
