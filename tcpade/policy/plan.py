"""What runs for one model: the user's config as given, and what calibration resolved.

``Resolved`` pairs the config (never changed, never copied with other values) with what
``tcpade.apply`` looked up for the model (``tcpade.policy.schedules.resolve``): the
predictor that runs (the config's, or with ``calibrated_predictor`` the one the model's
calibrations score best) and the model's calibrated schedules for it. It answers
``plan(T)``: the steps a T-step run computes when they are known before it runs.

Where a plan comes from (``plan_source``), first match:

* "schedule": ``config.schedule`` (only for its own ``schedule_steps``);
* "calibrated": a budget, and a calibrated schedule of the model with T steps and the
  budget's pass count (one that lost its held-out check is not among them);
* "spaced rule": a budget otherwise (``tcpade.policy.schedules.spaced``);
* "fixed rule": the TSI policy with a TSI test that never blocks: ``Rule.reason`` run over
  a simulated run (a computed step stores a residual, a skipped one too with
  ``store_predictions``, up to ``history_slots``);
* "policy": no plan (None), the run's trajectory decides.

``plan_note(T)`` says what the held-out checks (``tcpade.policy.schedules.checks``) measured for
a calibrated plan, or for the calibrated schedule a spaced-rule plan replaced.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ..core import coef as K
from . import schedules as S
from .rule import Counts, Rule

PLANS_KEPT = 16  # plans (per T) a Resolved keeps; a server's step counts vary per request


@dataclass(frozen=True)
class Resolved:
    config: "TCPadeConfig"  # noqa: F821  (the user's, as given)
    predictor: Optional[str] = None  # the predictor that runs; None: the config's
    calibrated: Tuple[Tuple[int, Tuple[int, ...]], ...] = ()  # the model's calibrated schedules, ((T, steps), ...)
    # their held-out checks, and those of calibrated schedules that lost theirs (not in
    # ``calibrated``): ((T, passes, calibrated dB, spaced rule dB), ...)
    checks: Tuple[Tuple[int, int, float, float], ...] = ()
    rule: Rule = field(init=False, repr=False, compare=False)
    _plans: Dict[int, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        predictor = self.config.predictor if self.predictor is None else self.predictor
        if predictor != self.config.predictor:
            # The config's checks with this predictor (its budget's pass count must cover the
            # predictor's minimum history); the config itself stays as it is.
            # (a fixed damping applies to rational and linear only: the runtime drops it for another)
            damping = self.config.damping if predictor in ("rational", "linear") else 0.0
            dataclasses.replace(self.config, predictor=predictor, damping=damping)
        object.__setattr__(self, "predictor", predictor)
        object.__setattr__(self, "calibrated", tuple((int(t), tuple(s)) for t, s in self.calibrated))
        object.__setattr__(self, "checks", tuple((int(t), int(p), float(c), float(s)) for t, p, c, s in self.checks))
        object.__setattr__(self, "rule", Rule.of(self.config, predictor))

    @property
    def min_history(self) -> int:
        """Residuals the predictors that may run need stored before they can predict (the
        calibrations' and the config's: ``predictor_for``)."""
        return max(K.MIN_HISTORY[self.predictor], K.MIN_HISTORY[self.config.predictor])

    def predictor_for(self, total: int) -> str:
        """The predictor of a ``total``-step run: ``predictor`` (the calibrations', with
        ``calibrated_predictor``) where the run follows one of the model's calibrated schedules, the
        config's own where it does not (the spaced rule, or no plan): a calibrated predictor was
        chosen with its schedules, and the spaced rule's default predictor was chosen with it."""
        if self.predictor == self.config.predictor or self._plan(total)[1] == "calibrated":
            return self.predictor
        return self.config.predictor

    def budget_passes(self, total: int) -> Optional[int]:
        """The passes a budget computes in a run of ``total`` steps, or None (no budget)."""
        c, m = self.config, self.min_history
        if c.passes is not None:
            k = min(c.passes, total)
        elif c.speedup is not None:
            k = min(total, max(m, int(math.floor(total / c.speedup + 0.5))))
        else:
            return None
        if c.budget_max_run is not None:
            k = max(k, S.min_passes(total, c.budget_max_run, m))
        return k

    def plan(self, total: int) -> Optional[Tuple[int, ...]]:
        """The computed steps of a ``total``-step run when they are fixed in advance, or None."""
        return self._plan(total)[0]

    def plan_source(self, total: int) -> str:
        """Where ``plan(total)`` comes from (module docstring)."""
        return self._plan(total)[1]

    def plan_note(self, total: int) -> str:
        """What is known of ``plan(total)``'s quality against the spaced rule: for a calibrated plan,
        its held-out check ("held-out 38.12 dB, spaced rule 37.20 dB") or "unvalidated"; for a
        spaced-rule plan that replaced a calibrated schedule which lost its check, that check;
        else ""."""
        steps, source = self._plan(total)
        if source not in ("calibrated", "spaced rule"):
            return ""
        check = next(((c, s) for t, p, c, s in self.checks if t == total and p == len(steps)), None)
        if source == "calibrated":
            if check is None:
                return "unvalidated: no held-out check"
            return f"held-out {check[0]:.2f} dB, spaced rule {check[1]:.2f} dB"
        if check is None or check[0] > check[1]:
            return ""
        return f"the calibrated schedule lost on held-out inputs: {check[0]:.2f} dB, spaced rule {check[1]:.2f} dB"

    def _plan(self, total: int) -> Tuple[Optional[Tuple[int, ...]], str]:
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"total steps must be an int > 0, got {total!r}")
        plans = self._plans
        if total not in plans:
            found = self._make(total)
            if len(plans) >= PLANS_KEPT:
                plans.pop(next(iter(plans)), None)
            plans[total] = found
        return plans[total]

    def _make(self, total: int) -> Tuple[Optional[Tuple[int, ...]], str]:
        c = self.config
        if c.schedule is not None:
            if total != c.schedule_steps:
                raise ValueError(
                    f"TCPadeConfig.schedule is for schedule_steps={c.schedule_steps} steps, this run has "
                    f"{total}: use config.rescaled({total}), a budget (TCPadeConfig.budget), or calibrate for {total}"
                )
            return c.schedule, "schedule"
        k = self.budget_passes(total)
        if k is not None:
            for t, steps in self.calibrated:
                if t == total and len(steps) == k:
                    return steps, "calibrated"
            return S.spaced(total, k, K.MIN_HISTORY[self.config.predictor]), "spaced rule"  # (the config's predictor runs it)
        if not self.rule.fixed:
            return None, "policy"
        return self._simulate(total), "fixed rule"

    def _simulate(self, total: int) -> Tuple[int, ...]:
        """The steps ``rule.reason`` computes in a run of ``total`` steps, its counts simulated."""
        c, computed, state = self.config, [], Counts(skipped=0, stored=0)
        for k in range(total):
            if self.rule.reason(k, total, state) is not None:
                computed.append(k)
                state = Counts(0, min(state.stored + 1, c.history_slots))
            else:
                stored = min(state.stored + 1, c.history_slots) if c.store_predictions else state.stored
                state = Counts(state.skipped + 1, stored)
        return tuple(computed)
