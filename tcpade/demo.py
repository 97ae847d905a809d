"""``python -m tcpade demo``: the kernels on a synthetic denoising trajectory.

No model and no download: the block-stack residual of a 20-step flow-matching run is
stood in for by a smooth rational function of the (shifted, non-uniform) sigma schedule
plus a small per-step perturbation. The demo runs the published skip pattern (warm-up 4
steps, every 4th step computed, the last step computed) through the residual history
and the fused ops, and prints, per predictor, the relative error of the predicted
residuals against the true ones, the TSI trace, and the time of one fused predict call
on each backend present. It is a kernel demo: the end-to-end demo on a trained model
replaces it once the diffusers integration lands.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from . import coef as K
from . import ops
from .history import History


def flow_sigmas(steps: int, shift: float = 3.0) -> list:
    """FLUX-style shifted sigmas: sigma' = shift*s / (1 + (shift-1)*s), s uniform in (1, 0]."""
    out = []
    for k in range(steps):
        s = 1.0 - k / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


def synthetic_trajectory(steps: int, shape, seed: int = 0):
    """(h_in, R) per step: R follows (A + B*sigma) / (1 + c*sigma) per token row."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = torch.randn(shape, generator=g)
    c = 0.6 * torch.rand(*shape[:-1], 1, generator=g)
    data, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = []
    for s in flow_sigmas(steps):
        r = (a + b * s) / (1.0 + c * s) + 0.01 * torch.randn(shape, generator=g)
        h_in = data * (1.0 - s) + noise * s  # the embedded latent moves along the flow path
        out.append((h_in, r, s))
    return out


def published_schedule(steps: int, warmup: int = 4, interval: int = 4) -> list:
    return [k <= warmup or k % interval == 0 or k == steps - 1 for k in range(steps)]


def run_variant(traj, variant: str, compute: list):
    hist = History(nslots=3, keep_prev_input=(variant == "paper"))
    errs, tsis = [], []
    steps = len(traj)
    for k, (h_in, r, s) in enumerate(traj):
        if compute[k] or hist.count < K.MIN_HISTORY[variant]:
            sums = hist.record(h_in, h_in + r, s)
            tsis.append(hist_tsi(sums) if hist.count >= 3 else float("nan"))
            continue
        stage = K.stage_of(k, steps)
        cf = hist.coef(
            variant,
            stage,
            s,
            pade_c=K.paper_curvature_flag(hist.last_sums.tolist() if hist.last_sums is not None else None, hist.count),
        )
        out, sums = hist.predict(h_in, cf, variant, s, store=(variant == "paper"))
        pred = out - h_in
        errs.append(((pred - r).norm() / r.norm()).item())
        tsis.append(hist_tsi(sums) if variant == "paper" else float("nan"))
    return errs, tsis


def hist_tsi(sums) -> float:
    from .reference import tsi_from_sums

    return tsi_from_sums(sums.tolist())


def time_backends(shape, reps: int = 20):
    """Median ms of one fused rational predict on each CPU backend present."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(shape, generator=g)
    ring = torch.randn((3, *shape), generator=g)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32)
    cf = K.coef_tensor(K.build_coef("rational", "middle", [0.6, 0.7, 0.8], 0.5, 3, 3), "cpu")
    out = {}
    for b in ops.available_backends("cpu"):
        if b == "triton":
            continue  # the interpreter is a correctness tool, not a speed one
        with ops.use_backend(b):
            ops.predict(h, ring, slots, cf, None, "rational", False, True)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                ops.predict(h, ring, slots, cf, None, "rational", False, True)
                ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        out[b] = ts[len(ts) // 2]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tcpade demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=256)
    args = ap.parse_args(argv)
    shape = (1, args.tokens, args.channels)
    traj = synthetic_trajectory(args.steps, shape)
    compute = published_schedule(args.steps)
    n_full = sum(compute)
    print(f"tcpade kernel demo: synthetic {args.steps}-step flow-matching trajectory, hidden {shape}")
    print(
        f"published schedule: {n_full}/{args.steps} steps computed "
        f"({args.steps / n_full:.2f}x fewer block-stack passes); skipped: "
        f"{[k for k, c in enumerate(compute) if not c]}\n"
    )
    print("| predictor | mean rel. error of predicted residual | worst |")
    print("|---|---|---|")
    tsis = None
    for v in K.VARIANTS:
        errs, t = run_variant(traj, v, compute)
        if v == "paper":
            tsis = t
        print(f"| {v} | {sum(errs) / len(errs):.4f} | {max(errs):.4f} |")
    print("\nTSI per step (paper history rule; NaN until three residuals are stored):")
    print("  " + " ".join("  -  " if math.isnan(x) else f"{x:.3f}" for x in tsis))
    print(
        "\none fused rational predict on this CPU, median ms:",
        ", ".join(f"{b}: {ms:.3f}" for b, ms in time_backends(shape).items()),
    )
    return 0
