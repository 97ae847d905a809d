"""Microbenchmark of tcpade's predict op (a skipped step: h_out = h_in + predicted residual).

Variants: paper (the published [2/1] form; "paper+" is the call as the paper's method makes
it: input-change correction from h_prev and the prediction stored in the history), rational
(time-aware [1/1] Pade, one denominator per token row), reuse, linear. Contenders
(bench/_bench_common.py): tcpade's kernel (Triton on CUDA, C++ on CPU), the same math as
separate eager torch ops, torch.compile of that math, and, for paper+, the published code's
way (its unfused fp32 ops, whole-tensor finiteness checks read back to the host, a list
append). The published code has no other variant. Shapes and dtypes as in bench_update.py.

    python bench/bench_predict.py                        # CUDA: every variant, shape and dtype
    python bench/bench_predict.py --device cpu --quick   # CPU: C++ vs eager vs compiled
    python bench/bench_predict.py --variants paper+,rational --shapes flux1024 --dtypes bf16
"""

from __future__ import annotations

import argparse
import sys

import _bench_common as B

CASES = B.PREDICT_CASES


def run(device, shapes, dtypes, copy_gbs, providers=B.PROVIDERS, compile_at=None, reps=20, log=lambda s: None,
        variants=None, sweep=False):  # fmt: skip
    """The rows for gpu_check.py (same as the command line)."""
    cases = [c for c in CASES if variants is None or c.name in variants]
    return B.run_cases(cases, shapes, dtypes, device, copy_gbs, providers, compile_at, reps, log, sweep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.parse_common(ap, "all")
    ap.add_argument("--variants", default=",".join(c.name for c in CASES))
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    B.main_common(args, [c for c in CASES if c.name in names], "tcpade predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
