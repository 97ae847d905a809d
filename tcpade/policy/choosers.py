"""The two choosers that learn from the run: how many steps to skip next (policy "error") and
which candidate predicts them (predictor "auto").

Each keeps its state for one branch's run (and its expert's history), and is fed from two
sides: the device side at the call (no host wait) and the host side when the reader brings a
computed step's sums to the host (``tcpade.policy.reader``).

* ``ErrorSteps`` (docs/method.md section 7): at every computed step with enough history the
  predictor first predicts that step (a probe into the ring's free slot), the update pass
  measures e = ||R_hat - R|| / ||R||, and the next run of skipped steps is sized from e
  against the tolerance like an ODE solver's step: e <= tol/2 -> one step longer, e <= tol ->
  the same (at least one), e <= 2 tol -> one shorter, else none; capped by max_skips.
* ``AutoChoice`` (``tcpade.core.layout.CHOOSERS``): every computed call with enough history
  probes the rational prediction of itself (one memory pass), and the update's sums give the
  error the linear extrapolation would have made, ||d2 + lam1 d1||^2 with d1 = R1 - R2,
  d2 = R - R1 and lam1 the linear weight on R2 (no pass of its own). The next skipped calls
  use the candidate whose relative errors, summed over the run's computed steps so far, are
  smaller, as a device-side coefficient mask (the rational kernel with its pole term off is
  the linear extrapolation): no host wait, so fixed schedules read nothing during the run.
  The host repeats the same rule on the values it reads, for the records and the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..core import coef as K
from ..core import layout as L


@dataclass
class ErrorSteps:
    """Policy "error": the run of skips the last measured error allows."""

    length: int = 0  # planned length of the next run of skips
    left: int = 0  # skips of it still to come

    def measured(self, e: float, tolerance: float, max_skips: int) -> None:
        """Size the next run of skips from a probe's relative error ``e`` (NaN: none)."""
        if not math.isfinite(e) or e > 2.0 * tolerance:
            n = 0
        elif e > tolerance:
            n = max(0, self.length - 1)
        elif e > 0.5 * tolerance:
            n = max(1, self.length)  # within tolerance: keep the run (and start one if none)
        else:
            n = self.length + 1
        self.length = self.left = min(n, max_skips)

    def skipped(self) -> None:
        self.left = max(0, self.left - 1)


@dataclass
class AutoChoice:
    """Predictor "auto": the candidate the next skips use, on the device and as the host read it."""

    mask: Optional[torch.Tensor] = None  # the coefficient mask of the chosen candidate (device)
    errors: Optional[torch.Tensor] = None  # the candidates' accumulated relative errors (device)
    host: Tuple[float, float] = (0.0, 0.0)  # the same, from the sums read so far

    def probed(self, sums: torch.Tensor, coef: torch.Tensor) -> None:
        """The device side, at a computed call whose probe chooses: fold its sums in."""
        self.mask, self.errors = choice_mask(sums, coef, self.errors)

    def read(self, v, lam1: float, predictor: str) -> Tuple[str, Optional[float]]:
        """The host side, from the read sums ``v`` of the same call: (the candidate chosen, the
        relative error of linear when it is chosen, else None)."""
        e_rat, e_lin = candidate_errors(v.d11, v.d22, v.d12, v.err2, v.r2 if v.r2 > 0 else 1.0, lam1)
        a_rat, a_lin = self.host[0] + e_rat, self.host[1] + e_lin
        self.host = (a_rat, a_lin)
        linear = a_lin < a_rat  # (the rule of choice_mask)
        error = (math.sqrt(max(e_lin, 0.0)) if v.r2 > 0 else math.nan) if linear else None
        return L.CHOOSERS[predictor][1 if linear else 0], error


def candidate_errors(d11, d22, d12, err2, r2, lam1):
    """Predictor "auto": the squared errors of rational (the probe's ``err2``) and of linear
    extrapolation (||d2 + lam1 d1||^2 = d22 + 2 lam1 d12 + lam1^2 d11) on one computed step,
    relative to ``r2`` = ||R||^2 (> 0). Floats (the host's records) or 0-d tensors (the device)."""
    lin2 = d22 + 2.0 * lam1 * d12 + lam1 * lam1 * d11
    return err2 / r2, lin2 / r2


def choice_mask(sums: torch.Tensor, coef: torch.Tensor, acc: Optional[torch.Tensor]):
    """Predictor "auto", on the device: the coefficient mask of the candidate with the smaller
    error summed over the run's computed steps so far (``acc``: the sums before this step, or
    None), and the new sums. Per step, relative to ||R||^2: rational's squared error is the
    probe's ``err2``, linear's ||d2 + lam1 d1||^2 = d22 + 2 lam1 d12 + lam1^2 d11 (the update's
    sums; lam1 from the probe's coefficients). Linear is chosen only when strictly smaller (a
    NaN keeps rational); its mask zeroes the pole bound ``bmax``, which turns the rational
    kernel into linear extrapolation."""
    s = dict(zip(L.SUMS, sums.to(torch.float64)))
    r2 = torch.where(s["r2"] > 0, s["r2"], torch.ones_like(s["r2"]))
    e = candidate_errors(s["d11"], s["d22"], s["d12"], s["err2"], r2, coef[K.LAM1].to(torch.float64))
    new = torch.stack(e)
    acc = new if acc is None else acc + new
    keep = (~(acc[1] < acc[0])).to(coef.dtype)
    mask = torch.ones_like(coef)
    mask[K.BMAX] = keep
    return mask, acc
