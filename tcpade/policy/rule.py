"""The host's rule: why step k of a T-step run is computed, from two host counts.

``Rule.reason(k, T, state)`` is the one place the rule is written. The runtime asks it at
every call of a run that no fixed plan decides (with the branch's own counts), and
``tcpade.policy.plan`` asks it once per step of a simulated run to list, before a run
starts, the steps the TSI policy computes when its TSI test never blocks a skip.

In order, a step is computed for:

* "warmup": k <= warmup;
* "final": one of the last ``final_steps`` steps;
* "interval": (TSI policy) k a multiple of ``interval`` (> 0);
* "max-skips": ``max_skips`` is 0, or that many steps in a row were skipped before it;
* "history": fewer residuals stored than a skip needs (the predictor's minimum,
  ``tcpade.core.coef.MIN_HISTORY``; three with a TSI test that can block, which reads
  three residuals).

None: the rule lets step k be skipped; the TSI test or the error policy's run of skips
(``tcpade.policy.runtime``) has the last word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from ..core import coef as K


class Counts(NamedTuple):
    """The host counts of a run that the rule reads, before step k."""

    skipped: int  # steps skipped in a row just before k
    stored: int  # residuals in the history


@dataclass(frozen=True)
class Rule:
    warmup: int
    final_steps: int
    interval: int  # 0: no interval steps (also every policy but "tsi")
    max_skips: int
    need: int  # residuals a skip needs stored
    fixed: bool  # the rule decides every step: the TSI policy with a TSI that never blocks

    @classmethod
    def of(cls, config, predictor: str) -> "Rule":
        """The rule of ``config`` with ``predictor`` running (the config's, or the one calibration
        chose: ``tcpade.policy.plan.Resolved``)."""
        tsi = config.policy == "tsi"
        blocks = tsi and config.tsi_threshold < 1.0  # a TSI test that can block reads three residuals
        need = max(3, K.MIN_HISTORY[predictor]) if blocks else K.MIN_HISTORY[predictor]
        return cls(config.warmup, config.final_steps, config.interval if tsi else 0, config.max_skips, need,
                   fixed=tsi and not blocks)  # fmt: skip

    def forced(self, k: int, total: int) -> Optional[str]:
        """Why step k of ``total`` is computed whatever the history says, or None."""
        if k <= self.warmup:
            return "warmup"
        if k >= total - self.final_steps:
            return "final"
        if self.interval > 0 and k % self.interval == 0:
            return "interval"
        return None

    def reason(self, k: int, total: int, state: Counts) -> Optional[str]:
        """Why step k of ``total`` is computed, from the host counts before it; None: it may be skipped."""
        forced = self.forced(k, total)
        if forced:
            return forced
        if self.max_skips == 0 or state.skipped >= self.max_skips:
            return "max-skips"
        if state.stored < self.need:
            return "history"
        return None
