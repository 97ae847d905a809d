"""The reader: brings a branch's device sums to the host where asked, and folds them in.

Every history write and every prediction leaves its sums on the device (``StepRecord.sums``,
a ``tcpade.core.history.Sums``). Nothing reads them by itself: reading one waits for the
device (a stream stall on CUDA), so the runtime reads only when a decision needs them, and
the summary reads them when it is asked for (``Runtime.read`` / ``Runtime.records``).

``read`` takes every unread record of the branch's run, oldest first, in one wait, and folds
each into the records and the run: the TSI of each write, a non-finite value (the run is
"poisoned": trajectory policies compute from then on), each probe's relative error, and
from it the choosers' host side (``tcpade.policy.choosers``). Without ``everything`` (the
summary's read) it reads nothing while the unread records are predictions that stored
nothing: only a history write can change a decision. The decisions are exactly those of
reading every write at the next call: an unread write can only change the decision of a call
that reads it, and a non-finite value found late relabels the calls it would have forced
("nonfinite"). ``waits`` counts the waits.
"""

from __future__ import annotations

import logging
import math

from ..core import layout as L
from ..core.reference import tsi_from_sums
from .choosers import candidate_errors
from .state import Branch, Run, StepRecord

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, resolved):
        c = resolved.config
        self.error_policy = c.policy == "error"
        self.tolerance, self.max_skips = c.tolerance, c.max_skips
        self.waits = 0  # times the host waited for a branch's sums

    def read(self, b: Branch, everything: bool = False) -> None:
        """Fold the unread records of ``b``'s run (a decision's read: only when one of them wrote
        the history; ``everything``: always)."""
        run = b.run
        todo = run.records[run.read :]
        if not todo or not (everything or any(r.stored and not r.sums.read for r in todo)):
            return
        if any(not r.sums.read for r in todo):
            self.waits += 1
        for rec in todo:
            self._fold(b, rec)
        run.read = len(run.records)

    def _fold(self, b: Branch, rec: StepRecord) -> None:
        run = b.run
        v = rec.sums.get()
        if not rec.computed and not rec.stored:  # a prediction that wrote nothing: only its fallback counts
            if v.nonfinite != 0.0:
                _poison(run, rec)
            return
        poisoned_before = run.poisoned
        if rec.stored >= 3:
            rec.tsi = tsi_from_sums(v)
        # Non-finite values written at this call (a stale NaN further back in the history
        # only turns the TSI into NaN, which blocks skipping by itself).
        if v.nonfinite != 0.0 or not (math.isfinite(v.r2) and math.isfinite(v.nonfinite)):
            _poison(run, rec)
        if poisoned_before:
            if rec.computed and not run.planned:
                rec.reason = "nonfinite"  # read at once, this call would have been computed as "nonfinite"
        elif rec.probed:
            rec.error = math.sqrt(v.err2 / v.r2) if v.r2 > 0 else math.nan
            if rec.choose and rec.sums.extra:  # predictor "auto": the candidate the device chose
                i = int(rec.sums.extra[0])
                rec.choice = L.AUTO_CANDIDATES[i].name
                e = candidate_errors(v.d11, v.d22, v.d12, v.err2, v.r2, rec.lam1, rec.tau1)[i] if v.r2 > 0 else math.nan
                rec.error = math.sqrt(e) if e >= 0.0 else math.nan  # the chosen candidate's error at this step
            if self.error_policy and not run.planned:
                b.errors.measured(rec.error, self.tolerance, self.max_skips)


def _poison(run: Run, rec: StepRecord) -> None:
    rec.nonfinite = True
    if not run.poisoned:
        what = "computing from now on" if not run.planned else "predictions fall back to h_in + R1"
        log.warning("tcpade: non-finite values in the trajectory at step %d: %s", rec.k, what)
    run.poisoned = True
