"""The per-call decision: compute the block stack, or skip it and predict its residual.

``Runtime`` implements the adapter's Controller protocol (``begin`` before the first
block, ``end`` after the last): it keeps one residual history per CFG branch, decides
per call from the step index k, the total T, the schedule time and the history, and
runs the fused ops. The only host synchronisation per call is in ``begin`` (reading the
previous pass's 8 sums, plus the predicted step's non-finite count on a skip): it is one
small function marked ``torch.compiler.disable``.

Policies (TCPadeConfig.policy):

* "tsi" (the paper): steps 0..warmup, every interval-th step and the final step(s) are
  computed; any other step is skipped while three residuals are stored, the TSI of the
  newest one passes (TSI <= tsi_threshold) and fewer than max_skips steps in a row were
  skipped.
* "error" (method.md section 7): at every computed step with enough history the
  predictor first predicts that step (a probe into the ring's free slot), the update pass
  then measures e = ||R_hat - R|| / ||R||, and the next run of skipped steps is sized
  from e against the tolerance like an ODE solver's step: e <= tol/2 -> one step longer,
  e <= tol -> the same (at least one), e <= 2 tol -> one shorter, else none; capped by
  max_skips.

A non-finite value anywhere in the trajectory (a computed h_out, or a prediction) forces
full computation for the rest of that branch's run and is recorded in the summary.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import coef as K
from .config import TCPadeConfig
from .history import History
from .reference import tsi_from_sums

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One transformer call of one branch, as the summary shows it."""

    k: int
    t: float
    computed: bool
    reason: str
    stage: str
    tsi: float = math.nan  # TSI of the residual written at this call (NaN: not enough history)
    error: float = math.nan  # probe error of this call's prediction (error policy)
    nonfinite: bool = False


@dataclass
class _Pending:
    k: int
    t: float
    reason: str
    stage: str
    probed: bool
    nonfinite: bool = False


@dataclass
class BranchState:
    history: History
    k: int = 0
    run: int = 0  # error policy: planned length of the next run of skips
    run_left: int = 0
    consecutive: int = 0
    poisoned: bool = False
    pending: Optional[_Pending] = None  # the call being computed (between begin and end)
    unread: bool = False  # the history was written since its sums were last read
    last_probed: bool = False
    last_values: Optional[list] = None
    records: List[StepRecord] = field(default_factory=list)
    runs: int = 0  # sampling runs started
    reset_pending: bool = False

    def new_run(self) -> None:
        self.reset_pending = False
        self.history.reset()
        self.k = self.run = self.run_left = self.consecutive = 0
        self.poisoned = self.unread = self.last_probed = False
        self.pending = None
        self.last_values = None
        self.records = []
        self.runs += 1

    def restarted(self, t: float) -> bool:
        """Does time t begin a new sampling run? (A run interrupted by an exception leaves
        k mid-way; the schedule's time going back says a new run started.)"""
        if not self.records:
            return False
        t0, t_last = self.records[0].t, self.records[-1].t
        if t == t0:
            return True
        direction = math.copysign(1.0, t_last - t0) if t_last != t0 else -1.0  # diffusers: decreasing
        return (t - t_last) * direction < 0


def _scalar_time(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("the transformer was called with an empty timestep tensor")
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class Runtime:
    """TC-Pade for one transformer: per-branch histories, the policy, the fused ops.

    total_steps: a callable returning T for the current sampling run (e.g. the length
    of the pipeline scheduler's timesteps), or None, then ``set_steps`` must be called.
    Without a known T every call is computed (with one warning): stages and the final
    steps cannot be placed, and full computation is always safe.
    """

    def __init__(self, config: Optional[TCPadeConfig] = None, total_steps: Optional[Callable[[], int]] = None):
        self.config = config or TCPadeConfig()
        if not isinstance(self.config, TCPadeConfig):
            raise TypeError(f"config must be a TCPadeConfig, got {type(self.config).__name__}")
        self._total_steps_fn = total_steps
        self._total: Optional[int] = None
        self._warned_no_steps = False
        self.branches: Dict[str, BranchState] = {}
        c = self.config
        gamma = c.input_correction if c.input_correction is not None else K.default_gamma(c.predictor)
        self._gamma = float(gamma)

    # ------------------------------------------------------------------ plumbing
    def set_steps(self, total: Optional[int]) -> None:
        """Fix T for the coming runs; None goes back to the ``total_steps`` callable."""
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
            raise ValueError(f"total steps must be an int > 0 or None, got {total!r}")
        self._total = total

    @property
    def steps_override(self) -> Optional[int]:
        """The T fixed by ``set_steps``, or None."""
        return self._total

    def total_steps(self) -> Optional[int]:
        if self._total is not None:
            return self._total
        if self._total_steps_fn is not None:
            total = self._total_steps_fn()
            return int(total) if total else None
        return None

    def reset(self) -> None:
        """End the current sampling run: the next call of every branch starts a new one.

        (diffusers pipelines reset stateful hooks at the end of each call; the records of
        the run just finished stay readable through ``tcpade.summary`` until then.)"""
        for b in self.branches.values():
            b.reset_pending = True

    def _branch(self, name: str) -> BranchState:
        b = self.branches.get(name)
        if b is None:
            b = BranchState(History(nslots=self.config.history_slots, keep_prev_input=self._gamma != 0.0))
            self.branches[name] = b
        return b

    @property
    def nbytes(self) -> int:
        return sum(b.history.nbytes for b in self.branches.values())

    # ------------------------------------------------------------------- protocol
    @torch.compiler.disable
    def begin(self, branch: str, h_in: torch.Tensor, timestep) -> Optional[torch.Tensor]:
        """Before the block stack: None to compute it, or the predicted h_out to skip it."""
        b = self._branch(branch)
        t = _scalar_time(timestep)
        total = self.total_steps()
        if b.pending is not None:
            # The previous call never reached end() (an exception inside the block stack):
            # its probe may have overwritten a slot, so start over.
            log.warning("tcpade: branch %r: the previous call did not finish; history reset", branch)
            b.new_run()
        elif b.reset_pending or (total is not None and b.k >= total) or b.restarted(t):
            b.new_run()
        if b.history.ensure(h_in) and b.k > 0:
            log.info("tcpade: branch %r: hidden-state shape/dtype/device changed; new run", branch)
            b.new_run()
        k = b.k
        last = self._read_last(b)
        if total is None:
            if not self._warned_no_steps:
                warnings.warn(
                    "tcpade: the number of denoising steps is unknown (use tcpade.apply on the pipeline, or "
                    "Runtime.set_steps(T)): computing every step",
                    stacklevel=2,
                )
                self._warned_no_steps = True
            return self._compute(b, h_in, k, t, "steps-unknown", "middle", probe=False)
        c = self.config
        stage = K.stage_of(k, total, c.early_frac, c.late_frac)
        reason = self._reason_to_compute(b, k, total, last)
        if reason is not None:
            probe = c.policy == "error" and not b.poisoned and b.history.count >= K.MIN_HISTORY[c.predictor]
            return self._compute(b, h_in, k, t, reason, stage, probe)
        return self._skip(b, h_in, k, t, stage, last)

    @torch.compiler.disable
    def end(self, branch: str, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """After the block stack ran: store R = h_out - h_in."""
        b = self._branch(branch)
        p = b.pending
        if p is None:
            raise RuntimeError(f"tcpade: end() for branch {branch!r} without a matching begin()")
        b.pending = None
        b.history.record(h_in, h_out, p.t, probe=p.probed)
        b.unread, b.last_probed = True, p.probed
        b.records.append(StepRecord(p.k, p.t, True, p.reason, p.stage, nonfinite=p.nonfinite))
        b.k += 1

    # ------------------------------------------------------------------- internals
    def _read_last(self, b: BranchState) -> Optional[list]:
        """The sums of the branch's last history write (the one host sync), folded into
        the branch state once: TSI and probe error on its record, poisoning on NaN."""
        if not b.unread:
            return b.last_values
        b.unread = False
        values = [float(v) for v in b.history.last_sums.tolist()]
        b.last_values = values
        rec = b.records[-1]
        if b.history.count >= 3:
            rec.tsi = tsi_from_sums(values)
        # Non-finite values written at this call (a stale NaN further back in the history
        # only turns the TSI into NaN, which blocks skipping by itself).
        if values[5] != 0.0 or not (math.isfinite(values[4]) and math.isfinite(values[5])):
            if not b.poisoned:
                log.warning("tcpade: non-finite values in the trajectory at step %d: computing from now on", rec.k)
            rec.nonfinite = True
            b.poisoned = True
        if b.last_probed:
            rec.error = math.sqrt(values[3] / values[4]) if values[4] > 0 else math.nan
            self._size_run(b, rec.error)
        return values

    def _size_run(self, b: BranchState, e: float) -> None:
        tol = self.config.tolerance
        if not math.isfinite(e) or e > 2.0 * tol:
            b.run = 0
        elif e > tol:
            b.run = max(0, b.run - 1)
        elif e > 0.5 * tol:
            b.run = max(1, b.run)  # within tolerance: keep the run (and start one if none)
        else:
            b.run = b.run + 1
        b.run = min(b.run, self.config.max_skips)
        b.run_left = b.run

    def _reason_to_compute(self, b: BranchState, k: int, total: int, last) -> Optional[str]:
        c = self.config
        if b.poisoned:
            return "nonfinite"
        forced = c.always_computed(k, total)
        if forced:
            return forced
        if c.max_skips == 0 or b.consecutive >= c.max_skips:
            return "max-skips"
        need = 3 if c.policy == "tsi" else K.MIN_HISTORY[c.predictor]
        if b.history.count < need:
            return "history"
        if c.policy == "tsi":
            tsi = tsi_from_sums(last) if last is not None else math.nan
            return None if tsi <= c.tsi_threshold else "tsi"  # NaN never passes
        return None if b.run_left > 0 else "error"

    def _compute(self, b, h_in, k, t, reason, stage, probe, nonfinite=False):
        if probe:
            cf = self._coef(b, stage, t, b.last_values)
            b.history.predict(h_in, cf, self.config.predictor, t, write_out=False, probe=True)
        b.pending = _Pending(k, t, reason, stage, probe, nonfinite)
        b.consecutive = 0
        return None

    def _skip(self, b, h_in, k, t, stage, last):
        c = self.config
        cf = self._coef(b, stage, t, last)
        out, sums = b.history.predict(h_in, cf, c.predictor, t, store=c.store_predictions)
        bad = float(sums[5])  # host sync: never hand a non-finite prediction to the model
        if bad != 0.0:
            log.warning("tcpade: non-finite prediction at step %d: computing it instead", k)
            b.poisoned = True
            if c.store_predictions:
                b.unread = False  # the stored prediction is garbage: do not read its sums
            return self._compute(b, h_in, k, t, "nonfinite", stage, probe=False, nonfinite=True)
        if c.store_predictions:
            b.unread, b.last_probed = True, False
        b.records.append(StepRecord(k, t, False, "skip", stage))
        b.k += 1
        b.consecutive += 1
        b.run_left = max(0, b.run_left - 1)
        return out

    def _coef(self, b: BranchState, stage: str, t: float, last) -> list:
        c = self.config
        kw = dict(delta=c.pole_delta, kappa=c.kappa)
        if c.input_correction is not None:
            kw["gamma"] = c.input_correction
        if c.predictor == "paper":
            kw["pade_c"] = K.paper_curvature_flag(last, b.history.count)
        return b.history.coef(c.predictor, stage, t, **kw)
