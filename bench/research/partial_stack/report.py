"""The tables of bench/research/partial_stack/README.md from partial_stack.csv and bench/results/quality_<model>.csv.

    .venv/bin/python bench/research/partial_stack/report.py > bench/research/partial_stack/tables.md

Per model x steps x level: the best whole-stack run of ours (library: rational / linear / reuse on the
spaced rule; "auto" shown apart), the best partial-stack run (over n_f, n_b and predictor), the best
ridge-fit run (over axis, anchor, m, degree, rho) and the best peer at that compute (rows of the quality
CSV whose group is not "full" and does not start with "tcpade", speedup >= level * 0.999, highest PSNR).
Then every fixed setting's mean and worst difference over all the scenarios (a per-scenario best is
chosen after the fact; a library default has to be one setting).
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
OURS = ("lib:rational", "lib:linear", "lib:reuse")


def best(rows, level):
    ok = [r for r in rows if float(r["speedup"]) >= level * 0.999]
    return max(ok, key=lambda r: float(r["psnr"])) if ok else None


def peer_best(model, steps, level):
    path = os.path.join(ROOT, "bench", "results", f"quality_{model}.csv")
    if not os.path.exists(path):
        return None
    rows = [r for r in csv.DictReader(open(path)) if r["steps"] == str(steps) and r["group"] != "full"
            and not r["group"].startswith("tcpade") and r["psnr"] not in ("", "nan")]  # fmt: skip
    return best(rows, level)


def fmt(r, what):
    if r is None:
        return "-", "-"
    return f"{float(r['psnr']):.2f}", what(r)


def setting(r):
    if r["kind"] == "partial":
        return f"f{r['n_f']}b{r['n_b']} {r['method'][5:]}"
    return r["method"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=os.path.join(HERE, "partial_stack.csv"))
    args = ap.parse_args(argv)
    rows = list(csv.DictReader(open(args.csv)))
    scen = defaultdict(list)
    for r in rows:
        scen[(r["model"], int(r["steps"]), float(r["level"]))].append(r)
    keys = sorted(scen, key=lambda k: (k[0], k[1], k[2]))
    summary = []
    print("## Per scenario\n")
    print("| model | T | level | whole (ours) | K | partial | setting, K, speedup | fit | setting | "
          "partial - whole | fit - whole | auto | peer | peer label (speedup) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        rs = scen[k]
        level = k[2]
        whole = best([r for r in rs if r["method"] in OURS], level)
        part = best([r for r in rs if r["kind"] == "partial"], level)
        fit = best([r for r in rs if r["kind"] == "fit"], level)
        auto = best([r for r in rs if r["method"] == "lib:auto"], level)
        peer = peer_best(k[0], k[1], level)
        wp, wk = fmt(whole, lambda r: f"{r['method'][4:]}, {r['passes']}")
        pp, pk = fmt(part, lambda r: f"{setting(r)}, {r['passes']}, x{float(r['speedup']):.2f}")
        fp, fk = fmt(fit, lambda r: r["method"][4:])
        ap_, _ = fmt(auto, lambda r: "")
        qp, qk = fmt(peer, lambda r: f"{r['label']} (x{float(r['speedup']):.2f})")
        dpart = f"{float(part['psnr']) - float(whole['psnr']):+.2f}" if part and whole else "-"
        dfit = f"{float(fit['psnr']) - float(whole['psnr']):+.2f}" if fit and whole else "-"
        wm, wkk = wk.split(", ") if whole else ("-", "-")
        print(f"| {k[0]} | {k[1]} | {level:g} | {wp} ({wm}) | {wkk} | {pp} | {pk} | {fp} | {fk} | {dpart} | {dfit} | "
              f"{ap_} | {qp} | {qk} |")  # fmt: skip
        summary.append((k, whole, rs))
    for kind, title in (("partial", "partial-stack settings"), ("fit", "ridge-fit settings")):
        print(f"\n## Fixed {title} against the best whole-stack predictor of ours, over all scenarios\n")
        print("Difference in dB to the scenario's best of rational / linear / reuse (whole stack, spaced rule) and "
              "to rational alone (the library's default predictor); a scenario where the setting has no schedule "
              "at the level counts as a miss and is not in the mean.\n")  # fmt: skip
        print("| setting | scenarios | mean vs best | worst vs best | mean vs rational | worst vs rational | "
              "wins vs best |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        per = defaultdict(list)
        for _k, whole, rs in summary:
            rat = next((r for r in rs if r["method"] == "lib:rational"), None)
            for r in rs:
                if r["kind"] == kind and whole is not None and rat is not None:
                    per[setting(r)].append((float(r["psnr"]) - float(whole["psnr"]),
                                            float(r["psnr"]) - float(rat["psnr"])))  # fmt: skip
        n_all = len(summary)
        stats = []
        for s, d in per.items():
            mb = sum(x for x, _ in d) / len(d)
            stats.append((mb, s, d))
        stats.sort(reverse=True)
        for mb, s, d in stats[:12] if kind == "fit" else stats:
            wins = sum(1 for x, _ in d if x > 0)
            print(f"| {s} | {len(d)}/{n_all} | {mb:+.2f} | {min(x for x, _ in d):+.2f} | "
                  f"{sum(y for _, y in d) / len(d):+.2f} | {min(y for _, y in d):+.2f} | {wins} |")  # fmt: skip


if __name__ == "__main__":
    main()
