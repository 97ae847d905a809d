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
* ``AutoChoice`` (``tcpade.core.layout.CHOOSERS``, ``AUTO_CANDIDATES``): every computed call
  with enough history probes the rational prediction of itself (one memory pass); the update's
  sums give the errors every other candidate would have made, with d1 = R1 - R2, d2 = R - R1,
  lam1 the linear weight on R2 and d the candidate's damping weight (d = 1 linear, 0 reuse):
  ||d2 + d lam1 d1||^2 = d22 + 2 d lam1 d12 + d^2 lam1^2 d11 (no pass of its own). The next
  skipped calls use the candidate whose relative errors, summed over the run's computed steps
  so far, are the smallest, as a device-side row choice among the candidates' coefficient
  vectors: no host wait, so fixed schedules read nothing during the run. The branches of one
  step (CFG's cond and uncond) share one ``AutoChoice``: their errors are summed and they use
  the same candidate (the runtime joins them), since differing choices stop their errors from
  cancelling in the guided output. The chosen index travels to the host with the step's sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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
    """Predictor "auto": which candidate the next skips use (a device index into
    ``AUTO_CANDIDATES``; None: none measured yet, ``AUTO_FIRST``) and the candidates' relative
    errors summed so far (device, float64)."""

    index: Optional[torch.Tensor] = None
    errors: Optional[torch.Tensor] = None

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """The coefficient vector the next skip uses, from every candidate's (``rows``, device)."""
        return rows[L.AUTO_FIRST] if self.index is None else rows[self.index]

    def probed(self, sums: torch.Tensor, lam1: float, tau1: float) -> torch.Tensor:
        """The device side, at a computed call whose probe chooses: fold its sums in (``lam1``,
        ``tau1``: the probe's linear weight on R2 and R2's normalised time) and return the index
        chosen (a 1-element float tensor, to travel to the host with the sums)."""
        e = candidate_errors_device(sums, lam1, tau1)
        self.errors = e if self.errors is None else self.errors + e
        self.index = torch.argmin(torch.nan_to_num(self.errors, nan=math.inf))
        return self.index.reshape(1).to(sums.dtype)


def candidate_errors(d11, d22, d12, err2, r2, lam1, tau1):
    """Predictor "auto", on the host: every candidate's squared error on one computed step
    relative to ``r2`` = ||R||^2 (> 0), in ``AUTO_CANDIDATES`` order: rational's is the probe's
    ``err2``, the others' d22 + 2 d lam1 d12 + d^2 lam1^2 d11 with their damping weight d."""
    out = []
    for c, d in zip(L.AUTO_CANDIDATES, K.candidate_dampings(tau1)):
        if c.kind == "rational":
            out.append(err2 / r2)
        else:
            dl = d * lam1
            out.append((d22 + 2.0 * dl * d12 + dl * dl * d11) / r2)
    return out


def candidate_errors_device(sums: torch.Tensor, lam1: float, tau1: float) -> torch.Tensor:
    """``candidate_errors`` on the device, from one write's sums (float64, one entry per candidate;
    a NaN where a sum is NaN)."""
    s = sums.to(torch.float64)
    d11, d22, d12, err2, r2 = (s[L.SUMS.index(n)] for n in ("d11", "d22", "d12", "err2", "r2"))
    r2 = torch.where(r2 > 0, r2, torch.ones_like(r2))
    ds = K.candidate_dampings(tau1)
    a = [2.0 * d * lam1 for d in ds]
    b = [(d * lam1) ** 2 for d in ds]
    ab = torch.tensor([a, b], dtype=torch.float64)
    if s.device.type == "cuda":  # pinned and non-blocking: no wait for the queued work
        ab = ab.pin_memory().to(s.device, non_blocking=True)
    e = d22 + ab[0] * d12 + ab[1] * d11
    return torch.cat([err2.reshape(1), e[1:]]) / r2  # candidate 0 is rational: its error is the probe's
