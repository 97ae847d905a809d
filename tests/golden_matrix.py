"""Run the golden test (tests/test_golden.py) under several CPU code paths and thread counts,
and print the largest deviation per quantity against its tolerance.

    python tests/golden_matrix.py                         # default, avx2, avx512 x 1, 2 threads
    python tests/golden_matrix.py --mkl AVX2              # + MKL's AVX2 path (its path on AMD CPUs)
    python tests/golden_matrix.py --capabilities avx2 --threads 1 -k wan-digits

Each combination is one pytest process (ATEN_CPU_CAPABILITY is read when torch starts), run
one after the other. A row's cells are "deviation / tolerance" at the case where that ratio
is largest (decisions: the number of cases whose decisions differ, which must be 0). The
capability torch really used is printed too (it falls back on a CPU without the one asked).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUANTITIES = ("tsi", "error", "mean", "point")


def run(capability, threads, mkl, select):
    env = dict(os.environ, TCPADE_GOLDEN_THREADS=str(threads))
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    if mkl:
        env["MKL_ENABLE_INSTRUCTIONS"] = mkl
    with tempfile.TemporaryDirectory() as tmp:
        env["TCPADE_GOLDEN_REPORT"] = report = os.path.join(tmp, "report.jsonl")
        cmd = [sys.executable, "-m", "pytest", "tests/test_golden.py", "-q", "-p", "no:cacheprovider",
               "-k", "test_presets_match_golden" + (f" and ({select})" if select else "")]  # fmt: skip
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        lines = [json.loads(x) for x in Path(report).read_text().splitlines()] if os.path.exists(report) else []
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return dict(capability=capability, threads=threads, mkl=mkl, rc=proc.returncode, summary=summary, wall=wall,
                lines=lines, failures=proc.stdout if proc.returncode else "")  # fmt: skip


def table(rows):
    head = ["capability (used)", "threads", "MKL", "result", "time"] + [f"{q} dev/tol" for q in QUANTITIES]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    worst = {q: (0.0, "") for q in QUANTITIES}
    for r in rows:
        used = sorted({x["capability"] for x in r["lines"]}) or ["?"]
        flips = sum(x["report"]["decisions"][0] for x in r["lines"])
        cells = [f"{r['capability'] or 'unset'} ({','.join(used)})", str(r["threads"]), r["mkl"] or "-",
                 f"{r['summary']}; decisions differ in {flips:g} cases", f"{r['wall']:.0f} s"]  # fmt: skip
        for q in QUANTITIES:
            best = (0.0, 0.0, 0.0, "")
            for x in r["lines"]:
                if q in x["report"]:
                    d, t = x["report"][q]
                    ratio = d / t if t > 0 else (0.0 if d == 0 else float("inf"))
                    if ratio >= best[0]:
                        best = (ratio, d, t, x["case"])
            cells.append(f"{best[0]:.3f} ({best[1]:.2g} / {best[2]:.2g}, {best[3]})")
            if best[0] >= worst[q][0]:
                worst[q] = (best[0], f"{best[3]}, {r['capability']}/{r['threads']}/{r['mkl'] or '-'}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("worst ratio per quantity: " + "; ".join(f"{q} {w[0]:.3f} ({w[1]})" for q, w in worst.items()))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capabilities", default="default,avx2,avx512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mkl", default="", help="MKL_ENABLE_INSTRUCTIONS values for extra rows (avx512, 2 threads)")
    ap.add_argument("-k", dest="select", default="", help="pytest -k expression on the case ids")
    args = ap.parse_args()
    combos = [(c, int(t), "") for c in args.capabilities.split(",") if c for t in args.threads.split(",") if t]
    combos += [("avx512", 2, m) for m in args.mkl.split(",") if m]
    rows = []
    for c, t, m in combos:
        r = run(c, t, m, args.select)
        print(f"{c} x {t} threads{' MKL ' + m if m else ''}: {r['summary']} ({r['wall']:.0f} s)", flush=True)
        if r["rc"]:
            print(r["failures"][-3000:])
        rows.append(r)
    print()
    print(table(rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
