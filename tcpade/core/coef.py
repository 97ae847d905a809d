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

from . import layout as L
from .layout import NCOEF, PAPER, STAGES, VARIANTS  # noqa: F401  (VARIANTS: re-exported as tcpade.core.coef.VARIANTS)

# Index of each scalar inside the coefficient vector (named in tcpade.core.layout.COEF).
W_MAIN, C1, C2, GAMMA = (L.COEF.index(n) for n in ("w_main", "c1", "c2", "gamma"))
LAM1, LAM2 = L.COEF.index("lam1"), L.COEF.index("lam2")
ALP0, ALP1, ALP2 = (L.COEF.index(f"alp{i}") for i in range(3))
TAU0, TAU1, TAU2 = (L.COEF.index(f"tau{i}") for i in range(3))
BMAX, KAPPA = L.COEF.index("bmax"), L.COEF.index("kappa")
WAVG = L.COEF.index("wavg0")  # 4 consecutive slots

# Views of the variant table (tcpade.core.layout.VARIANT_TABLE) under the names callers use.
MIN_HISTORY = L.MIN_HISTORY
PREDICTORS = L.PREDICTORS
CHOOSERS = L.CHOOSERS
PAPER_STAGE_WEIGHTS = PAPER.stage_weights
PURE_STAGE_WEIGHTS = L.PURE_STAGE_WEIGHTS
PAPER_GAMMA = PAPER.gamma
PAPER_WAVG = PAPER.wavg

# Largest |tau| (a sample time's distance from the target in units of the last step)
# kept in the coefficients; farther samples are dropped (see time_weights).
TAU_MAX = 1e6


def default_gamma(variant: str) -> float:
    """The input-change correction weight a variant uses unless told otherwise."""
    return L.variant(L.kernel_variant(variant)).gamma


def check_variant(variant: str) -> int:
    """The kernels' code of ``variant`` (ValueError naming the allowed ones)."""
    return L.variant(variant).code


def stage_of(k: int, total: int, early_frac: float = PAPER.early_frac, late_frac: float = PAPER.late_frac) -> str:
    """Stage of step k (0-based) of ``total`` steps: early k <= early_frac T, late k > late_frac T.

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
    out = {"lam": (0.0, 1.0), "alp": (0.0, 0.0, 0.0), "tau": (0.0, 0.0, -1.0), "bmax_num": 0.0}
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
        out["lam"] = (-g, 1.0 + g)
    out["tau"] = (tau0, tau1, tau2)
    if n >= 3 and tau1 != tau2 and tau0 != tau1 and tau0 != tau2:
        a0 = 1.0 / ((tau0 - tau1) * (tau0 - tau2))
        a1 = 1.0 / ((tau1 - tau0) * (tau1 - tau2))
        a2 = 1.0 / ((tau2 - tau0) * (tau2 - tau1))
        if all(math.isfinite(a) for a in (a0, a1, a2)):
            out["alp"] = (a0, a1, a2)
            out["bmax_num"] = 1.0 / max(abs(tau0), abs(tau1), abs(tau2))
    return out


def gap_damping(tau1: float, damping: float) -> float:
    """The damping weight d = 1 / (1 + a g) of a prediction whose R2 sits at ``tau1``
    (``time_weights``' units: R1 at -1, the target at 0), so g = 1 / (|tau1| - 1) is how far
    the target lies past R1 in units of the R2 -> R1 spacing. 1 where there is no usable R2
    (the prediction is then R1 anyway) or ``damping`` a is 0."""
    a = abs(float(tau1))
    if damping <= 0.0 or not (a > 1.0 and math.isfinite(a)):
        return 1.0
    return 1.0 / (1.0 + damping / (a - 1.0))


def damp(c: list, d: float) -> list:
    """Coefficients ``c`` pulled toward R1: R_hat <- d R_hat + (1 - d) R1 (the stage blend's
    weights; no kernel change). d = 0: reuse of R1."""
    c = list(c)
    c[W_MAIN], c[C1], c[C2] = d * c[W_MAIN], d * c[C1] + (1.0 - d), d * c[C2]
    return c


def candidate_rows(values: Sequence[float]) -> list:
    """Predictor "auto": the coefficient vector of every candidate (``layout.AUTO_CANDIDATES``,
    in order) from the rational prediction's ``values`` (``build_coef("rational", ...)``). All run
    the rational kernel: linear is its pole term off (bmax = 0), damped linear that pulled toward
    R1 by ``gap_damping``, reuse all weight on R1 (the main term, linear, weighted 0)."""
    rows = []
    for cand, d in zip(L.AUTO_CANDIDATES, candidate_dampings(values[TAU1])):
        c = list(values)
        if cand.kind != "rational":
            c[BMAX] = 0.0
            c = damp(c, d) if d != 1.0 else c
        rows.append(c)
    return rows


def candidate_dampings(tau1: float) -> list:
    """The damping weight d of every "auto" candidate for a prediction whose R2 sits at ``tau1``
    (rational and linear 1, reuse 0); their errors on a computed step follow from it
    (``tcpade.policy.choosers``)."""
    return [0.0 if c.kind == "reuse" else gap_damping(tau1, c.damping) for c in L.AUTO_CANDIDATES]


def build_coef(
    variant: str,
    stage: str,
    times: Sequence[float],
    t_target: float,
    count: int,
    nslots: int,
    *,
    gamma: Optional[float] = None,
    stage_weights: Optional[dict] = None,
    delta: float = 0.3,
    kappa: float = 0.0,
    damping: float = 0.0,
) -> list:
    """The coefficient vector (Python floats, float64) for one prediction.

    gamma: input-change correction weight; None -> the variant's default (the variant
    table: the paper's ``PAPER.gamma``, 0 for the others). The caller passes 0 when no
    previous input is stored.
    stage_weights: {stage: (w_main, c1, c2)}; None -> the variant's (paper's blend for
    "paper", the main prediction alone for the others).
    delta: pole guard margin, 0 < delta < 1 (larger = safer, closer to linear).
    kappa: rational's bound on its deviation from linear (>= 0, 0 = off).
    damping: a >= 0 (0 = off; rational and linear only): the prediction pulled toward R1 as
    the gap grows, R_hat <- d R_hat + (1 - d) R1 with d = ``gap_damping(tau1, a)``.
    """
    v = L.variant(variant)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not kappa >= 0.0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    if not (damping >= 0.0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if damping > 0.0 and v.name not in ("rational", "linear"):
        raise ValueError(f"damping applies to the rational and linear predictors, not {v.name!r}")
    if nslots < 3:
        raise ValueError(f"nslots must be >= 3, got {nslots}")
    c = [0.0] * NCOEF
    weights = v.stage_weights if stage_weights is None else stage_weights
    c[W_MAIN], c[C1], c[C2] = (float(x) for x in weights[stage])
    c[GAMMA] = float(v.gamma if gamma is None else gamma)
    tw = time_weights(times, t_target, count)
    c[LAM1], c[LAM2] = tw["lam"]
    c[ALP0], c[ALP1], c[ALP2] = tw["alp"]
    c[TAU0], c[TAU1], c[TAU2] = tw["tau"]
    c[BMAX] = (1.0 - delta) * tw["bmax_num"]
    c[KAPPA] = float(kappa)
    if damping > 0.0:
        c = damp(c, gap_damping(c[TAU1], damping))
    n = max(1, min(int(count), nslots, len(PAPER.wavg)))
    w = PAPER.wavg[:n]
    tot = sum(w)
    for i, wi in enumerate(w):
        c[WAVG + i] = wi / tot
    return c


def coef_tensor(values: Sequence[float], device, dtype=torch.float32) -> torch.Tensor:
    """The coefficient vector as the tensor the ops take (float32 on the tensors' device)."""
    return torch.tensor(list(values), dtype=dtype, device=device)
