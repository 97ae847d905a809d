"""Per-step scalar coefficients shared by every backend.

The kernels (Triton, C++, torch reference) are deliberately "dumb": every elementwise
prediction is a fixed formula of the stored residuals whose scalar weights depend only on
the schedule times, the stage and the config. Those weights are computed here, once per
step, in float64 on the host, and handed to the kernels as one small tensor (``coef``).
Keeping all time logic (divided differences, degenerate grids, the pole guard bound) in
one place means the three backends cannot disagree about it, and a per-step change of
time or stage is a change of tensor *values*, never of shapes or Python constants, so a
compiled graph is not recompiled across steps.

Slot naming: R1 is the newest stored residual, R2 the one before, R3 before that, R4 the
oldest (only with four slots). In time coordinates the samples are (tau0, y0) = R3,
(tau1, y1) = R2, (tau2, y2) = R1, and the target step sits at tau = 0.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

VARIANTS = ("paper", "rational", "reuse", "linear")
STAGES = ("early", "middle", "late")

# Index of each scalar inside the coefficient vector.
W_MAIN = 0  # weight of the variant's main prediction in the stage blend
C1 = 1  # weight of R1 in the stage blend
C2 = 2  # weight of R2 in the stage blend
GAMMA = 3  # input-change correction: R_eff = R_hat + GAMMA * (h_in - h_prev)
# Linear extrapolation to tau = 0 from (R2, R1): LAM1 * R2 + LAM2 * R1. LAM0 is reserved
# (always 0): linear extrapolation reads two residuals, never R3.
LAM0, LAM1, LAM2 = 4, 5, 6
ALP0, ALP1, ALP2 = 7, 8, 9  # second divided difference weights on (R3, R2, R1)
TAU0, TAU1, TAU2 = 10, 11, 12  # normalised times of (R3, R2, R1)
BMAX = 13  # pole guard: |b1| <= BMAX keeps 1 + b1*tau >= delta on [min tau, 0]
KAPPA = 14  # rational: bound ||R_hat - R_lin||_row <= KAPPA * ||R1 - R2||_row (0 = off)
MU = 15  # rational: relative Tikhonov shrink of the row denominator fit
PADE_C = 16  # paper: c in den = 1 - 0.1*s*c (1 = curvature test passed)
WAVG = 17  # paper fallback: 4 weights on (R1, R2, R3, R4), renormalised to the history
NCOEF = 24

# The paper's stage blend: R_hat = W_MAIN*main + C1*R1 + C2*R2 (docs/method.md section 4).
PAPER_STAGE_WEIGHTS = {
    "early": (0.0, 0.9, 0.1),
    "middle": (1.0, 0.0, 0.0),
    "late": (1.0, 0.3, -0.3),
}
PURE_STAGE_WEIGHTS = {s: (1.0, 0.0, 0.0) for s in STAGES}
PAPER_GAMMA = 0.2
PAPER_WAVG = (0.4, 0.3, 0.2, 0.1)

# Largest |tau| (a sample time's distance from the target in units of the last step)
# kept in the coefficients; farther samples are dropped (see time_weights).
TAU_MAX = 1e6

# Residuals a variant needs before it may predict (fewer -> the caller must compute).
MIN_HISTORY = {"paper": 2, "rational": 2, "reuse": 1, "linear": 2}


def default_gamma(variant: str) -> float:
    """The input-change correction weight a variant uses unless told otherwise."""
    return PAPER_GAMMA if variant == "paper" else 0.0


def check_variant(variant: str) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return VARIANTS.index(variant)


def stage_of(k: int, total: int, early_frac: float = 0.3, late_frac: float = 0.8) -> str:
    """Stage of step k (0-based) of ``total`` steps: early k <= 0.3T, late k > 0.8T.

    The published code hard-wires T = 20; the boundaries scale with the real T here.
    """
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if k <= early_frac * total:
        return "early"
    if k > late_frac * total:
        return "late"
    return "middle"


def time_weights(times: Sequence[float], t_target: float, count: int) -> dict:
    """Linear and rational extrapolation weights to ``t_target``.

    ``times`` holds the schedule times of (R1, R2, R3) (newest first; entries past
    ``count`` are ignored). Degenerate grids degrade to a lower order instead of
    dividing by zero: a repeated or missing third time -> linear; a repeated second
    time, or a target equal to the newest time -> reuse of R1. Non-finite times also
    degrade to reuse.
    """
    out = {"lam": (0.0, 0.0, 1.0), "alp": (0.0, 0.0, 0.0), "tau": (0.0, 0.0, -1.0), "bmax_num": 0.0}
    n = min(int(count), 3)
    if n < 2:
        return out
    t2, t1 = float(times[0]), float(times[1])
    h = float(t_target) - t2
    if not (math.isfinite(h) and math.isfinite(t1) and math.isfinite(t2)) or h == 0.0:
        return out
    tau2 = -1.0
    tau1 = (t1 - t_target) / h
    if not abs(tau1) <= TAU_MAX:
        # The target is over TAU_MAX times closer to R1 than R2 is: linear extrapolation
        # differs from reusing R1 by < 1/TAU_MAX of R1 - R2, and a larger tau overflows
        # the fp32 coefficient tensor (found by tests/test_fuzz.py).
        return out
    tau0 = tau1
    if n >= 3 and math.isfinite(float(times[2])):
        t0 = (float(times[2]) - t_target) / h
        if abs(t0) <= TAU_MAX:  # else R3 is too far back to matter: linear from R2, R1
            tau0 = t0
    if tau1 != tau2:
        g = -tau2 / (tau2 - tau1)
        out["lam"] = (0.0, -g, 1.0 + g)
    out["tau"] = (tau0, tau1, tau2)
    if n >= 3 and tau1 != tau2 and tau0 != tau1 and tau0 != tau2:
        a0 = 1.0 / ((tau0 - tau1) * (tau0 - tau2))
        a1 = 1.0 / ((tau1 - tau0) * (tau1 - tau2))
        a2 = 1.0 / ((tau2 - tau0) * (tau2 - tau1))
        if all(math.isfinite(a) for a in (a0, a1, a2)):
            out["alp"] = (a0, a1, a2)
            out["bmax_num"] = 1.0 / max(abs(tau0), abs(tau1), abs(tau2))
    return out


def paper_curvature_flag(last_sums: Optional[Sequence[float]], count: int) -> float:
    """The paper's c in den = 1 + a1*c (docs/method.md section 2).

    The published notes name a "curvature test" without stating it. Our choice: c = 1
    while fewer than 5 residuals are stored (as the notes say), else when the second
    difference of the last three residuals is no larger than the first,
    ||R1 - 2R2 + R3|| <= ||R1 - R2||. Both norms come free from the TSI sums of the last
    write: ||d2 - d1||^2 = S(d2^2) + S(d1^2) - 2 S(d1 d2).
    """
    if count < 5 or last_sums is None:
        return 1.0
    s11, s22, s12 = float(last_sums[0]), float(last_sums[1]), float(last_sums[2])
    second = s22 + s11 - 2.0 * s12
    if not (math.isfinite(second) and math.isfinite(s22)):
        return 0.0
    return 1.0 if second <= s22 else 0.0


def build_coef(
    variant: str,
    stage: str,
    times: Sequence[float],
    t_target: float,
    count: int,
    nslots: int,
    *,
    gamma: Optional[float] = None,
    pade_c: float = 1.0,
    stage_weights: Optional[dict] = None,
    delta: float = 0.3,
    kappa: float = 0.0,
    mu: float = 0.0,
) -> list:
    """The coefficient vector (Python floats, float64) for one prediction.

    gamma: input-change correction weight; None -> the variant's default (paper 0.2,
    others 0). The caller passes 0 when no previous input is stored.
    stage_weights: {stage: (w_main, c1, c2)}; None -> paper blend for "paper", pure
    main prediction for the others.
    delta: pole guard margin, 0 < delta < 1 (larger = safer, closer to linear).
    """
    check_variant(variant)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if kappa < 0.0 or mu < 0.0:
        raise ValueError(f"kappa and mu must be >= 0, got kappa={kappa}, mu={mu}")
    if nslots < 3:
        raise ValueError(f"nslots must be >= 3, got {nslots}")
    c = [0.0] * NCOEF
    if stage_weights is None:
        stage_weights = PAPER_STAGE_WEIGHTS if variant == "paper" else PURE_STAGE_WEIGHTS
    c[W_MAIN], c[C1], c[C2] = (float(x) for x in stage_weights[stage])
    if gamma is None:
        gamma = default_gamma(variant)
    c[GAMMA] = float(gamma)
    tw = time_weights(times, t_target, count)
    c[LAM0], c[LAM1], c[LAM2] = tw["lam"]
    c[ALP0], c[ALP1], c[ALP2] = tw["alp"]
    c[TAU0], c[TAU1], c[TAU2] = tw["tau"]
    c[BMAX] = (1.0 - delta) * tw["bmax_num"]
    c[KAPPA] = float(kappa)
    c[MU] = float(mu)
    c[PADE_C] = float(pade_c)
    n = max(1, min(int(count), nslots, 4))
    w = PAPER_WAVG[:n]
    tot = sum(w)
    for i, wi in enumerate(w):
        c[WAVG + i] = wi / tot
    return c


def coef_tensor(values: Sequence[float], device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device)
