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


def setting(r):
    if r["kind"] in ("partial", "samek"):
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

    def psnr(r):
        return f"{float(r['psnr']):.2f}" if r else "-"

    def diff(a, b):
        return f"{float(a['psnr']) - float(b['psnr']):+.2f}" if a and b else "-"

    def peer_cell(k):
        p = peer_best(*k)
        return f"{psnr(p)} {p['label']} (x{float(p['speedup']):.2f})" if p else "-"

    agg = defaultdict(list)
    print("## (a) Partial stack at equal block compute\n")
    print("whole: the best of the library's rational / linear / reuse on spaced(T, K); partial: the best emulated "
          "partial-stack run (n_f, n_b, predictor) on spaced(T, K') with the most passes K' that reach the level at "
          "its real cost; same K: the best partial-stack run on the whole-stack schedule (more compute, speedup "
          "shown); peer: the best peer of bench/results/quality_<model>.csv at the level.\n")  # fmt: skip
    print("| model | T | level | whole | pred, K | partial | n_f n_b pred, K', speedup | partial - whole | "
          "same K: partial | setting, speedup | peer |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        rs, level = scen[k], k[2]
        whole = best([r for r in rs if r["method"] in OURS], level)
        part = best([r for r in rs if r["kind"] == "partial"], level)
        samek = [r for r in rs if r["kind"] == "samek"]
        sk = max(samek, key=lambda r: float(r["psnr"])) if samek else None
        wk = f"{whole['method'][4:]}, {whole['passes']}" if whole else "-"
        pk = f"{setting(part)}, {part['passes']}, x{float(part['speedup']):.2f}" if part else "no schedule"
        skk = f"{setting(sk)}, x{float(sk['speedup']):.2f}" if sk else "-"
        print(f"| {k[0]} | {k[1]} | {level:g} | {psnr(whole)} | {wk} | {psnr(part)} | {pk} | {diff(part, whole)} | "
              f"{psnr(sk)} | {skk} | {peer_cell(k)} |")  # fmt: skip
        summary.append((k, whole, rs))
        peer = peer_best(*k)
        for name, r in (("whole above peer", whole), ("partial above peer", part)):
            if r and peer:
                agg[name].append(float(r["psnr"]) > float(peer["psnr"]))
        if part and whole:
            agg["partial"].append(float(part["psnr"]) - float(whole["psnr"]))
        if sk and whole:
            agg["same K"].append(float(sk["psnr"]) - float(whole["psnr"]))
    print()
    for name in ("whole above peer", "partial above peer"):
        print(f"{name}: {sum(agg[name])} of {len(agg[name])} scenarios with both")
    for name in ("partial", "same K"):
        d = agg[name]
        if d:
            print(f"{name} - whole: {len(d)} scenarios, mean {sum(d) / len(d):+.2f} dB, min {min(d):+.2f}, "
                  f"max {max(d):+.2f}, better in {sum(x > 0 for x in d)}")  # fmt: skip

    print(
        "\nSame passes (samek rows), per setting: the partial-stack run minus the library's whole-stack run of the "
        "same predictor on the same schedule, in dB (the partial steps' extra compute not paid for).\n"
    )
    print("| setting | scenarios | mean | min | max |")
    print("|---|---|---|---|---|")
    per = defaultdict(list)
    for k in keys:
        lib = {r["method"][4:]: float(r["psnr"]) for r in scen[k] if r["kind"] == "whole"}
        for r in scen[k]:
            if r["kind"] == "samek" and r["method"][5:] in lib:
                per[setting(r)].append(float(r["psnr"]) - lib[r["method"][5:]])
    for s_, d in sorted(per.items()):
        print(f"| {s_} | {len(d)} | {sum(d) / len(d):+.2f} | {min(d):+.2f} | {max(d):+.2f} |")

    print("\n## (b) Ridge polynomial predictors, whole stack, spaced rule\n")
    print(
        "rational / linear / reuse / auto / damped: the library (damped: the best of TCPadeConfig.damping on "
        "linear 0.5, 1, 2, 4 and rational 1, 2); fit: the best emulated ridge fit (axis:anchor:m:degree:rho).\n"
    )
    print("| model | T | level | K | rational | linear | reuse | auto | damped | setting | fit | setting | "
          "fit - best of r/l/r | fit - best library | peer |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        rs, level = scen[k], k[2]

        one = {r["method"]: r for r in rs}.get
        whole = best([r for r in rs if r["method"] in OURS], level)
        damped = best([r for r in rs if r["kind"] == "damped"], level)
        fit = best([r for r in rs if r["kind"] == "fit"], level)
        libbest = best([r for r in rs if r["kind"] in ("whole", "damped")], level)
        kk = whole["passes"] if whole else "-"
        print(f"| {k[0]} | {k[1]} | {level:g} | {kk} | {psnr(one('lib:rational'))} | {psnr(one('lib:linear'))} | "
              f"{psnr(one('lib:reuse'))} | {psnr(one('lib:auto'))} | {psnr(damped)} | "
              f"{damped['method'][4:] if damped else '-'} | {psnr(fit)} | {fit['method'][4:] if fit else '-'} | "
              f"{diff(fit, whole)} | {diff(fit, libbest)} | {peer_cell(k)} |")  # fmt: skip
        if fit and whole and libbest:
            agg["fit - best of r/l/r"].append(float(fit["psnr"]) - float(whole["psnr"]))
            agg["fit - best library"].append(float(fit["psnr"]) - float(libbest["psnr"]))
    print()
    for name in ("fit - best of r/l/r", "fit - best library"):
        d = agg[name]
        print(
            f"{name} (the per-scenario best fit, chosen after the fact): {len(d)} scenarios, mean "
            f"{sum(d) / len(d):+.2f} dB, min {min(d):+.2f}, max {max(d):+.2f}, better in {sum(x > 0 for x in d)}"
        )
    for kind, title in (("partial", "partial-stack settings"), ("fit", "ridge-fit settings"),
                        ("damped", "library damped settings")):  # fmt: skip
        print(f"\n## Fixed {title} against the best whole-stack predictor of ours, over all scenarios\n")
        print("Difference in dB to the scenario's best of rational / linear / reuse (whole stack, spaced rule), "
              "to rational alone (the library's default predictor) and to auto (the library's online chooser); "
              "a scenario where the setting has no schedule at the level counts as a miss and is not in the "
              "mean.\n")  # fmt: skip
        print("| setting | scenarios | mean vs best | worst vs best | mean vs rational | worst vs rational | "
              "mean vs auto | worst vs auto | wins vs best |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        per = defaultdict(list)
        for _k, whole, rs in summary:
            rat = next((r for r in rs if r["method"] == "lib:rational"), None)
            auto = next((r for r in rs if r["method"] == "lib:auto"), None)
            for r in rs:
                if r["kind"] == kind and whole is not None and rat is not None and auto is not None:
                    p = float(r["psnr"])
                    per[setting(r)].append((p - float(whole["psnr"]), p - float(rat["psnr"]), p - float(auto["psnr"])))
        n_all = len(summary)
        stats = []
        for s, d in per.items():
            mb = sum(x[0] for x in d) / len(d)
            stats.append((mb, s, d))
        stats.sort(reverse=True)
        for _mb, s, d in stats:
            wins = sum(1 for x in d if x[0] > 0)
            cells = " | ".join(f"{sum(x[i] for x in d) / len(d):+.2f} | {min(x[i] for x in d):+.2f}" for i in range(3))
            print(f"| {s} | {len(d)}/{n_all} | {cells} | {wins} |")


if __name__ == "__main__":
    main()
