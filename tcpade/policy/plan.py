"""What runs for one model: the user's config as given, and what calibration resolved.

``Resolved`` pairs the config (never changed, never copied with other values) with what
``tcpade.apply`` looked up for the model (``tcpade.policy.schedules.resolve``): the model's
calibrated schedules, each with the predictor it was calibrated for (the config's; or, with
``calibrated_predictor``, at each (T, passes) the predictor whose calibration won its held-out
check by the most), and their held-out checks. It answers ``plan(T)``: the steps a T-step run
computes when they are known before it runs, and ``predictor_for(T)``: the predictor of that run.

Where a plan comes from (``plan_source``), first match:

* "schedule": ``config.schedule`` (only for its own ``schedule_steps``);
* "calibrated": a budget, and a calibrated schedule of the model with T steps and the
  budget's pass count (one that lost its held-out check is not among them);
* "spaced rule": a budget otherwise (``tcpade.policy.schedules.spaced``, placed on the run's
  times where they are given and ``config.time_spacing`` is not 0);
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
    # the predictor of the calibrated schedules and checks given without one; None: the config's
    predictor: Optional[str] = None
    # the model's calibrated schedules, ((T, steps, predictor), ...) (or (T, steps): ``predictor``'s)
    calibrated: Tuple[tuple, ...] = ()
    # their held-out checks, and those of calibrated schedules that lost theirs (not in
    # ``calibrated``): ((T, passes, calibrated dB, spaced rule dB, predictor), ...) (or without the
    # predictor: ``predictor``'s)
    checks: Tuple[tuple, ...] = ()
    rule: Rule = field(init=False, repr=False, compare=False)
    _plans: Dict[int, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        default = self.config.predictor if self.predictor is None else self.predictor
        object.__setattr__(self, "predictor", default)
        cal = [(int(e[0]), tuple(int(x) for x in e[1]), str(e[2]) if len(e) > 2 else default) for e in self.calibrated]
        checks = [(int(e[0]), int(e[1]), float(e[2]), float(e[3]), str(e[4]) if len(e) > 4 else default)
                  for e in self.checks]  # fmt: skip
        object.__setattr__(self, "calibrated", tuple(cal))
        object.__setattr__(self, "checks", tuple(checks))
        for predictor in self.predictors[1:]:
            # The config's checks with this predictor (its budget's pass count must cover the
            # predictor's minimum history); the config itself stays as it is.
            # (a fixed damping applies to rational and linear only: the runtime drops it for another)
            damping = self.config.damping if predictor in ("rational", "linear") else 0.0
            dataclasses.replace(self.config, predictor=predictor, damping=damping)
        neediest = max(self.predictors, key=lambda p: K.MIN_HISTORY[p])
        object.__setattr__(self, "rule", Rule.of(self.config, neediest))

    @property
    def predictors(self) -> Tuple[str, ...]:
        """Every predictor a run may use: the config's first, then the calibrated schedules' (by name)."""
        c = self.config.predictor
        return (c, *sorted({p for _, _, p in self.calibrated} - {c}))

    @property
    def min_history(self) -> int:
        """Residuals the predictors that may run need stored before they can predict (the
        calibrated schedules' and the config's: ``predictor_for``)."""
        return max(K.MIN_HISTORY[p] for p in self.predictors)

    def predictor_for(self, total: int, times=None) -> str:
        """The predictor of a ``total``-step run: the one its calibrated schedule was calibrated
        for where the run follows one of the model's calibrated schedules, the config's own where it
        does not (the spaced rule, or no plan): a calibrated predictor was chosen with its
        schedule, and the spaced rule's default predictor was chosen with it."""
        entry = self._plan(total, times)[2]
        return self.config.predictor if entry is None else entry[2]

    def budget_passes(self, total: int) -> Optional[int]:
        """The passes a budget computes in a run of ``total`` steps, or None (no budget)."""
        c, m = self.config, self.min_history
        if c.passes is not None:
            k = min(c.passes, total)
        elif c.speedup is not None:
            k = min(total, max(m, int(math.floor(total / c.speedup + 0.5))))
        else:
            return None
        if c.budget_max_run is not None and c.passes is None:
            # a count from the speedup is raised to keep the run cap; an explicit pass count is
            # kept (too few to keep the cap, the placement on the times is left as it is)
            k = max(k, S.min_passes(total, c.budget_max_run, m))
        return k

    def plan(self, total: int, times=None) -> Optional[Tuple[int, ...]]:
        """The computed steps of a ``total``-step run when they are fixed in advance, or None.
        ``times``: the run's time per step (the spaced rule places its steps on them,
        ``config.time_spacing``); None: the rule on the step index."""
        return self._plan(total, times)[0]

    def plan_source(self, total: int, times=None) -> str:
        """Where ``plan(total)`` comes from (module docstring)."""
        return self._plan(total, times)[1]

    def plan_note(self, total: int, times=None) -> str:
        """What is known of ``plan(total)``'s quality against the spaced rule: for a calibrated plan,
        its held-out check ("held-out 38.12 dB, spaced rule 37.20 dB") or "unvalidated"; for a
        spaced-rule plan that replaced calibrated schedules which lost their checks (a tie is a loss:
        the search may return the spaced rule's own schedule), the best of those checks; else ""."""
        steps, source, entry = self._plan(total, times)
        if source not in ("calibrated", "spaced rule"):
            return ""
        mine = [(c, s, pred) for t, p, c, s, pred in self.checks if t == total and p == len(steps)]
        if source == "calibrated":
            check = next(((c, s) for c, s, pred in mine if pred == entry[2]), None)
            if check is None:
                return "unvalidated: no held-out check"
            return f"held-out {check[0]:.2f} dB, spaced rule {check[1]:.2f} dB"
        lost = [(c, s) for c, s, _ in mine if c <= s]
        if not lost or len(lost) < len(mine):
            return ""
        c, s = max(lost)
        if len(lost) == 1:
            return f"the calibrated schedule did not beat it on held-out inputs: {c:.2f} dB, spaced rule {s:.2f} dB"
        return (f"none of the {len(lost)} calibrated schedules beat it on held-out inputs: the best {c:.2f} dB, "
                f"spaced rule {s:.2f} dB")

    def _plan(self, total: int, times=None) -> Tuple[Optional[Tuple[int, ...]], str, Optional[tuple]]:
        """(plan, its source, the calibrated entry it follows or None)."""
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"total steps must be an int > 0, got {total!r}")
        # the times matter only to the spaced rule, and only where they are not even in the step index
        weights = S.time_axis_weights(times, total, self.config.time_spacing) if times is not None else None
        key = (total, weights)
        plans = self._plans
        if key not in plans:
            found = self._make(total, weights)
            if len(plans) >= PLANS_KEPT:
                plans.pop(next(iter(plans)), None)
            plans[key] = found
        return plans[key]

    def _make(self, total: int, weights=None) -> Tuple[Optional[Tuple[int, ...]], str, Optional[tuple]]:
        c = self.config
        if c.schedule is not None:
            if total != c.schedule_steps:
                raise ValueError(
                    f"TCPadeConfig.schedule is for schedule_steps={c.schedule_steps} steps, this run has "
                    f"{total}: use config.rescaled({total}), a budget (TCPadeConfig.budget), or calibrate for {total}"
                )
            return c.schedule, "schedule", None
        k = self.budget_passes(total)
        if k is not None:
            for entry in self.calibrated:
                if entry[0] == total and len(entry[1]) == k:
                    return entry[1], "calibrated", entry
            # (the config's predictor runs it)
            m = K.MIN_HISTORY[self.config.predictor]
            steps = S._spaced(total, k, m, None, None, weights)
            # (the rule on the index keeps the cap by its count; an explicit count too few for it
            # is placed without the cut)
            if weights is not None and c.budget_max_run is not None and (
                    c.passes is None or k >= S.min_passes(total, c.budget_max_run, m)):
                steps = S.cap_runs(steps, c.budget_max_run)
            return steps, "spaced rule", None
        if not self.rule.fixed:
            return None, "policy", None
        return self._simulate(total), "fixed rule", None

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
