"""The tables every backend shares (torch reference, Triton, C++), in one place.

This module is plain Python (no torch): ``setup.py`` runs it to generate the C++ header of
the extension (``c_header``), the Triton kernels read its values as compile-time
constants, and the torch reference and ``tcpade.core.coef`` import it. Nothing here is copied
by hand into another file; ``tests/test_coef.py`` checks that a built extension was built
from this version of the tables.

* ``SUMS``: the device sums that every history write (the update pass, a stored or probed
  prediction) returns, by position. Code reads them by name (``SUMS.index(name)``):

  - ``d11``, ``d22``, ``d12``: <d1, d1>, <d2, d2>, <d1, d2> of the two newest residual
    differences (the TSI's three sums);
  - ``err2``: ||P - R||^2 of a probe prediction P against the computed residual R;
  - ``r2``: ||R||^2 of the residual written (of the prediction, for predict);
  - ``nonfinite``: the count of non-finite values written or predicted.

* ``COEF``: the per-step scalars of one prediction (built by ``tcpade.core.coef.build_coef``).
* ``PAPER``: the published method's constants.
* ``VARIANTS``: the predictors, each with the code the kernels switch on and the
  defaults that depend on it.
* ``CHOOSERS``: the config predictors that pick one of several variants online ("auto").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Tuple

SUMS = ("d11", "d22", "d12", "err2", "r2", "nonfinite")
NSUMS = len(SUMS)

# Scalars of one prediction, by position in the coefficient vector:
#   w_main, c1, c2  the stage blend R_hat = w_main * main + c1 * R1 + c2 * R2;
#   gamma           input-change correction R_eff = R_hat + gamma * (h_in - h_prev);
#   lam1, lam2      linear extrapolation to the target: lam1 * R2 + lam2 * R1;
#   alp0..alp2      second divided difference weights on (R3, R2, R1);
#   tau0..tau2      normalised times of (R3, R2, R1) (the target is at tau = 0);
#   bmax            rational pole guard: |b1| <= bmax;
#   kappa           rational: ||R_hat - R_lin||_row <= kappa * ||R1 - R2||_row (0 = off);
#   wavg0..wavg3    paper's last fallback: weights on (R1, R2, R3, R4), renormalised.
COEF = (
    "w_main", "c1", "c2", "gamma", "lam1", "lam2", "alp0", "alp1", "alp2",
    "tau0", "tau1", "tau2", "bmax", "kappa", "wavg0", "wavg1", "wavg2", "wavg3",
)  # fmt: skip
NCOEF = len(COEF)

STAGES = ("early", "middle", "late")


@dataclass(frozen=True)
class PaperConstants:
    """The published predictor's constants (the method document, section 2), by role.

    s = exp(-s_rate * |R1 - R2| / (0.5 (|R1| + |R2|) + s_eps))
    p = s (num_r1 R1 - R2) / den,  den = 1 - den_a s (kept |den| >= den_min, sign kept)
    avg = avg_r1 R1 + avg_r2 R2;  p = avg + clamp(p - avg, +-max(trust_d |R1 - R2|, trust_mag mag))
    beta = beta_s s + beta_0;  R_pade = beta p + (1 - beta) avg
    fallbacks: R1 + fb1 (R1 - R2), then sum_i wavg_i R_i (renormalised to the history)
    stages: R_hat = w_main R_pade + c1 R1 + c2 R2 per stage (``stage_weights``), stage
    boundaries at early_frac * T and late_frac * T; input-change correction gamma.

    The published code's denominator is 1 + a1 c with a1 = -den_a s and a curvature flag c;
    its test for c never fails (it compares the TSI, at most 1, with 1.4), so c = 1 always.
    """

    s_rate: float = 5.0
    s_eps: float = 1e-7
    num_r1: float = 2.0
    den_a: float = 0.1
    den_min: float = 1e-5
    avg_r1: float = 0.6
    avg_r2: float = 0.4
    trust_d: float = 0.5
    trust_mag: float = 0.1
    beta_s: float = 0.7
    beta_0: float = 0.3
    fb1: float = 0.5
    wavg: Tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    gamma: float = 0.2
    stage_weights: Mapping[str, Tuple[float, float, float]] = field(
        default_factory=lambda: MappingProxyType(
            {"early": (0.0, 0.9, 0.1), "middle": (1.0, 0.0, 0.0), "late": (1.0, 0.3, -0.3)}
        )
    )
    early_frac: float = 0.3
    late_frac: float = 0.8


PAPER = PaperConstants()

# The stage blend of every variant but the paper's: the main prediction alone.
PURE_STAGE_WEIGHTS = MappingProxyType({s: (1.0, 0.0, 0.0) for s in STAGES})


@dataclass(frozen=True)
class Variant:
    """One predictor: the int the kernels switch on and what depends on the choice."""

    name: str
    code: int
    min_history: int  # stored residuals before it may predict (fewer -> compute); rational and linear
    # predict from one residual as reuse does (coef.time_weights: no second time -> all weight on R1)
    gamma: float  # default input-change correction weight
    stage_weights: Mapping[str, Tuple[float, float, float]]  # stage -> (w_main, c1, c2)
    row_wise: bool  # one fit per token row (the rational kernel) instead of elementwise
    doc: str


_TABLE = (
    Variant("paper", 0, 2, PAPER.gamma, PAPER.stage_weights, False, "the published [2/1] form"),
    Variant("rational", 1, 1, 0.0, PURE_STAGE_WEIGHTS, True, "time-aware [1/1] Pade, one denominator per row"),
    Variant("reuse", 2, 1, 0.0, PURE_STAGE_WEIGHTS, False, "the newest residual R1"),
    Variant("linear", 3, 1, 0.0, PURE_STAGE_WEIGHTS, False, "linear extrapolation along the time axis"),
)
VARIANT_TABLE: Mapping[str, Variant] = MappingProxyType({v.name: v for v in _TABLE})
VARIANTS = tuple(VARIANT_TABLE)
assert [v.code for v in _TABLE] == list(range(len(_TABLE))), "variant codes are their positions"


# Predictors that choose among variants as the run goes (TCPadeConfig.predictor): name -> (the
# kernel variant that runs, the variants its candidates are). "auto": on every computed step with
# enough history the rational prediction of that step is probed (one memory pass); the errors of
# linear extrapolation, damped linear extrapolation and reuse follow from the update's sums; the
# next skipped steps use the candidate whose errors, summed over the run's computed steps so far
# (and over the CFG branches of the step), are the smallest (AUTO_CANDIDATES). Every candidate is
# the rational kernel with other coefficients (linear: pole term off, bmax = 0; damped: the stage
# blend pulled toward R1; reuse: all weight on R1), so the choice is a device-side row selection:
# no host wait, no recompilation.
CHOOSERS: Mapping[str, Tuple[str, ...]] = MappingProxyType({"auto": ("rational", "linear", "reuse")})


@dataclass(frozen=True)
class Candidate:
    """One candidate of predictor "auto": ``damping`` a (0: none) pulls the prediction toward the
    newest residual R1 as the gap grows, R_hat = d P + (1 - d) R1 with d = 1 / (1 + a g), g = how
    far the target lies past R1 in units of the R2 -> R1 spacing (``tcpade.core.coef.gap_damping``);
    ``kind`` "reuse" is R1 itself (d = 0)."""

    name: str
    kind: str  # "rational", "linear" or "reuse"
    damping: float = 0.0


# Damping strengths of the damped linear candidates (a = 0 is plain linear extrapolation).
AUTO_DAMPING = (0.5, 1.0, 2.0, 4.0, 8.0)
AUTO_CANDIDATES: Tuple[Candidate, ...] = (
    Candidate("rational", "rational"),
    Candidate("linear", "linear"),
    *(Candidate(f"damped-{a:g}", "linear", a) for a in AUTO_DAMPING),
    Candidate("reuse", "reuse"),
)
assert AUTO_CANDIDATES[0].kind == "rational", "candidate 0 is the probe's prediction (its error is the probe's)"
# The candidate the skips use before the first measurement (the damped middle of the range: a
# safe guess at any gap, between extrapolation and reuse).
AUTO_FIRST = next(i for i, c in enumerate(AUTO_CANDIDATES) if c.name == "damped-2")
PREDICTORS = VARIANTS + tuple(CHOOSERS)
# The one statement of how many residuals a predictor needs stored before it may predict (so the
# computed steps every schedule starts with): a variant's own, a chooser's the most of its candidates.
MIN_HISTORY: Mapping[str, int] = MappingProxyType(
    {**{v.name: v.min_history for v in VARIANT_TABLE.values()},
     **{n: max(VARIANT_TABLE[c].min_history for c in cands) for n, cands in CHOOSERS.items()}})


def kernel_variant(predictor: str) -> str:
    """The kernel variant a config predictor runs ("auto" -> "rational"; a variant -> itself)."""
    return CHOOSERS[predictor][0] if predictor in CHOOSERS else predictor


def variant(name: str) -> Variant:
    """The table row of predictor ``name`` (ValueError naming the allowed ones)."""
    try:
        return VARIANT_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}") from None


# ------------------------------------------------------------------------ the C++ header
def _c_float(x: float) -> str:
    """``x`` rounded to float32 as a C hex literal: exactly the value torch and Triton use
    for the same Python float (a decimal literal would round once more, from decimal)."""
    (f,) = struct.unpack("f", struct.pack("f", x))
    return f"{f.hex()}f" if f != 0.0 else "0.0f"


def c_header() -> str:
    """The C++ header of these tables (written by setup.py into the extension's build)."""
    lines = [
        "// Generated from tcpade/core/layout.py by setup.py. Do not edit: change tcpade/core/layout.py.",
        "#pragma once",
        "namespace tcl {",
        f"constexpr int NSUMS = {NSUMS};",
        *(f"constexpr int SUM_{n.upper()} = {i};" for i, n in enumerate(SUMS)),
        f"constexpr int NCOEF = {NCOEF};",
        *(f"constexpr int CF_{n.upper()} = {i};" for i, n in enumerate(COEF)),
        f"constexpr int NVARIANTS = {len(VARIANTS)};",
        *(f"constexpr int VARIANT_{v.name.upper()} = {v.code};" for v in _TABLE),
    ]
    for name in ("s_rate", "s_eps", "num_r1", "den_a", "den_min", "avg_r1", "avg_r2", "trust_d", "trust_mag",
                 "beta_s", "beta_0", "fb1"):  # fmt: skip
        lines.append(f"constexpr float PAPER_{name.upper()} = {_c_float(getattr(PAPER, name))};")
    lines.append("}  // namespace tcl")
    # X-macro over the integer entries, for the extension's layout() export.
    lines.append("#define TCL_LAYOUT(X) " + " ".join(f"X({k})" for k in compiled_layout()))
    lines.append("")
    return "\n".join(lines)


def compiled_layout() -> dict:
    """What ``tcpade._C.layout()`` returns when the extension was built from these tables."""
    d = {"NSUMS": NSUMS, "NCOEF": NCOEF, "NVARIANTS": len(VARIANTS)}
    d.update({f"SUM_{n.upper()}": i for i, n in enumerate(SUMS)})
    d.update({f"CF_{n.upper()}": i for i, n in enumerate(COEF)})
    d.update({f"VARIANT_{v.name.upper()}": v.code for v in _TABLE})
    return d
