"""Microbenchmark of tcpade's update op (a computed step: store R = h_out - h_in, TSI sums).

Contenders (bench/_bench_common.py): tcpade's kernel (Triton on CUDA, C++ on CPU), the same
math as separate eager torch ops, torch.compile of that math, and the published code's way
(append the residual to a list, the TSI from three whole-tensor norms read back to the host).
Shapes are the hidden states of FLUX.1-dev at 1024^2 and 512^2, Wan2.1-1.3B at 480p with 81
frames and DiT-XL/2 at 256^2 with a CFG batch of 2, in fp32, bf16 and fp16.

    python bench/bench_update.py                       # CUDA: every shape and dtype
    python bench/bench_update.py --device cpu --quick  # CPU: C++ vs eager vs compiled, small shapes
    python bench/bench_update.py --shapes flux1024 --dtypes bf16 --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import sys

import _bench_common as B

CASES = B.UPDATE_CASES


def run(device, shapes, dtypes, copy_gbs, providers=B.PROVIDERS, compile_at=None, reps=20, log=lambda s: None,
        sweep=False):  # fmt: skip
    """The rows for gpu_check.py (same as the command line)."""
    return B.run_cases(CASES, shapes, dtypes, device, copy_gbs, providers, compile_at, reps, log, sweep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.parse_common(ap, "all")
    args = ap.parse_args(argv)
    B.main_common(args, CASES, "tcpade update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
