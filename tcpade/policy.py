"""The per-call decision: compute the block stack, or skip it and predict its residual.

``Runtime`` implements the adapter's Controller protocol (``begin`` before the first
block, ``end`` after the last): it keeps one residual history per CFG branch, decides
per call from the step index k, the total T, the schedule time and the history, and
runs the fused ops. ``begin`` and ``end`` are marked ``torch.compiler.disable``: a
compiled transformer runs them eagerly between its compiled regions (two graph breaks per
call, no recompiles across steps; see the README's torch.compile section).

Host synchronisation (issue 5). Each history write (a computed step's update pass, or a
stored prediction) leaves 8 sums on the device; on CUDA their copy to pinned host memory
is queued right behind the write, with an event, at the end of step k. The host reads
them only when a decision depends on them: at a call whose compute-or-skip decision the
host cannot already make from k, T and the config (warm-up, interval and final steps,
max_skips, too little history, a known non-finite trajectory are all decided on the
host), and then it waits for that event only, not for the work queued after it. A skip
reads its prediction's non-finite count before handing the prediction to the model (the
published guarantee: never a non-finite prediction). All device sums reach the host through
``_start_read`` / ``_finish_reads`` (one place; a cross-rank reduction goes there).
Records read by ``summary`` bring outstanding sums to the host first. The decisions are
exactly those of reading every write at the next call: an outstanding write can only
change the decision of a call that reads it, and a non-finite value found late is
marked on the records it would have marked. ``Runtime.host_reads`` counts the waits.

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
class _Write:
    """One history write whose sums are on their way to the host."""

    record: StepRecord  # the call that wrote
    count: int  # residuals stored right after the write
    probed: bool  # the write slot held a probe prediction (error policy)
    sums: torch.Tensor  # the sums (CPU), or their pinned host copy (CUDA, valid once ``event`` is done)
    event: Optional[object] = None  # torch.cuda.Event recorded after the copy was queued


@dataclass
class BranchState:
    history: History
    k: int = 0
    run: int = 0  # error policy: planned length of the next run of skips
    run_left: int = 0
    consecutive: int = 0
    poisoned: bool = False
    pending: Optional[_Pending] = None  # the call being computed (between begin and end)
    unread: List[_Write] = field(default_factory=list)  # history writes whose sums the host has not read
    last_values: Optional[list] = None  # the sums of the newest write the host has read
    _records: List[StepRecord] = field(default_factory=list)
    runs: int = 0  # sampling runs started
    reset_pending: bool = False
    reader: Optional[Callable[["BranchState"], None]] = field(default=None, repr=False)

    @property
    def records(self) -> List[StepRecord]:
        """The calls of the current run; reading them first brings outstanding sums to the host."""
        if self.unread and self.reader is not None:
            self.reader(self)
        return self._records

    def new_run(self) -> None:
        self.reset_pending = False
        self.history.reset()
        self.k = self.run = self.run_left = self.consecutive = 0
        self.poisoned = False
        self.unread = []  # the previous run's records are dropped unread with them
        self.pending = None
        self.last_values = None
        self._records = []
        self.runs += 1

    def restarted(self, t: float) -> bool:
        """Does time t begin a new sampling run? (A run interrupted by an exception leaves
        k mid-way; the schedule's time going back says a new run started.)"""
        if not self._records:
            return False
        t0, t_last = self._records[0].t, self._records[-1].t
        if t == t0:
            return True
        if t_last == t0:
            # One record (or a constant schedule) gives no direction yet. Assuming diffusers'
            # decreasing one here made every increasing schedule restart at step 1, forever.
            return False
        return (t - t_last) * (t_last - t0) < 0


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
        # Builds each branch's History; tcpade.distributed swaps in one whose sums are
        # reduced over the ranks that hold the other image tokens (sequence parallelism).
        self.history_factory: Callable[..., History] = History
        self.host_reads = 0  # times the host waited for device values (each a stream stall on CUDA)
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
            b = BranchState(self.history_factory(nslots=self.config.history_slots, keep_prev_input=self._gamma != 0.0))
            b.reader = self._read_writes
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
        guess = None
        if b.unread and self._needs_sums(b, k, total):
            # The decision waits for the device anyway: queue the prediction first, when it
            # cannot disturb a compute, so one wait brings both the sums the decision needs
            # and the prediction's non-finite count (a skip's second wait saved; a compute
            # wastes one prediction pass, a few hidden-state reads).
            if self._may_guess(b):
                out, sums = b.history.predict(h_in, self._coef(b, stage, t, b.last_values), c.predictor, t)
                guess = (out, sums, self._read_writes(b, also=self._start_read(sums)))
            else:
                self._read_writes(b)
        reason = self._reason_to_compute(b, k, total)
        if reason is not None:
            probe = (c.policy == "error" and not b.poisoned and b.history.count >= K.MIN_HISTORY[c.predictor]
                     and c.plan(total) is None)  # fmt: skip
            return self._compute(b, h_in, k, t, reason, stage, probe)
        return self._skip(b, h_in, k, t, stage, guess)

    @torch.compiler.disable
    def end(self, branch: str, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """After the block stack ran: store R = h_out - h_in."""
        b = self._branch(branch)
        p = b.pending
        if p is None:
            raise RuntimeError(f"tcpade: end() for branch {branch!r} without a matching begin()")
        b.pending = None
        sums = b.history.record(h_in, h_out, p.t, probe=p.probed)
        rec = StepRecord(p.k, p.t, True, p.reason, p.stage, nonfinite=p.nonfinite)
        b._records.append(rec)
        b.unread.append(_Write(rec, b.history.count, p.probed, *self._start_read(sums)))
        b.k += 1

    # ------------------------------------------------------------------- internals
    # Every device sums tensor reaches the host through _start_read (queued at the write)
    # and _finish_reads (the wait): a cross-rank reduction, so that all ranks decide alike,
    # belongs at the top of _start_read.
    def _start_read(self, sums: torch.Tensor):
        """Queue the copy of a write's sums to the host: (host tensor, event or None).

        CUDA: a non-blocking copy into pinned memory and an event recorded behind it on the
        current stream; reading waits for that event only. Elsewhere the sums are already
        host memory."""
        if sums.device.type != "cuda":
            return sums, None
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _finish_reads(self, pending) -> List[list]:
        """Host values of queued reads [(host tensor, event or None)], after one wait."""
        self.host_reads += 1
        for _, event in pending:
            if event is not None:
                event.synchronize()
        return [[float(v) for v in host.tolist()] for host, _ in pending]

    @property
    def _min_history(self) -> int:
        """Stored residuals a skip needs: the predictor's minimum, and three for a TSI that can
        block (threshold < 1). A TSI that never blocks needs no third residual: on the trained
        zoo models waiting for one cost the evenly spaced 8-of-20 schedule (0, 1, 3, 6, .., 18)."""
        c = self.config
        if c.policy == "tsi" and c.tsi_threshold < 1.0:
            return max(3, K.MIN_HISTORY[c.predictor])
        return K.MIN_HISTORY[c.predictor]

    def _needs_sums(self, b: BranchState, k: int, total: int) -> bool:
        """Can sums still on the device change this call's decision (or its coefficients)?

        No when the host alone already decides to compute: a known non-finite trajectory,
        a step the config always computes, max_skips reached, too little history. (The
        paper predictor's probe reads its curvature flag from the last sums: the error
        policy with it and five or more slots reads at every probe.)"""
        c = self.config
        if b.poisoned:
            return False
        plan = c.plan(total)
        if plan is not None:  # a fixed schedule: only a skip reads (poisoning, the paper's flag)
            return k not in plan
        forced = c.always_computed(k, total) or c.max_skips == 0 or b.consecutive >= c.max_skips
        need = self._min_history
        if forced or b.history.count < need:
            return c.policy == "error" and c.predictor == "paper" and b.history.count >= 5
        return True

    def _may_guess(self, b: BranchState) -> bool:
        """May this call's prediction be made before the decision? Only when making it and
        then computing leaves the state exactly as computing alone: no stored prediction,
        no previous input to overwrite (the input-change correction), no coefficient read
        from the sums being waited for (the paper predictor's curvature flag)."""
        c = self.config
        h = b.history
        return (
            not c.store_predictions
            and h.h_prev is None
            and c.predictor != "paper"
            and h.count >= K.MIN_HISTORY[c.predictor]
        )

    def _read_writes(self, b: BranchState, also=None) -> Optional[list]:
        """Bring the sums of every unread history write of ``b`` to the host (one wait) and
        fold them, oldest first, into the branch state: TSI and probe error on each write's
        record, poisoning on a non-finite value, the error policy's run length. ``also``: one
        more queued read (``_start_read``) to wait for at the same time; its values are returned."""
        writes, b.unread = b.unread, []
        pending = [(w.sums, w.event) for w in writes] + ([also] if also is not None else [])
        if not pending:
            return None
        values = self._finish_reads(pending)
        for v, w in zip(values, writes):
            self._fold(b, w, v)
        return values[-1] if also is not None else None

    def _fold(self, b: BranchState, w: _Write, values: list) -> None:
        rec = w.record
        poisoned_before = b.poisoned
        b.last_values = values
        if w.count >= 3:
            rec.tsi = tsi_from_sums(values)
        # Non-finite values written at this call (a stale NaN further back in the history
        # only turns the TSI into NaN, which blocks skipping by itself).
        if values[5] != 0.0 or not (math.isfinite(values[4]) and math.isfinite(values[5])):
            if not b.poisoned:
                log.warning("tcpade: non-finite values in the trajectory at step %d: computing from now on", rec.k)
            rec.nonfinite = True
            b.poisoned = True
        if poisoned_before:
            # Read late: read at once, this call would have been computed as "nonfinite", without a probe.
            rec.reason = "nonfinite"
        elif w.probed:
            rec.error = math.sqrt(values[3] / values[4]) if values[4] > 0 else math.nan
            self._size_run(b, rec.error)

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

    def _reason_to_compute(self, b: BranchState, k: int, total: int) -> Optional[str]:
        c = self.config
        if b.poisoned:
            return "nonfinite"
        plan = c.plan(total)
        if plan is not None:  # a fixed schedule: exactly its steps, max_skips does not cap it
            return "schedule" if k in plan else None
        forced = c.always_computed(k, total)
        if forced:
            return forced
        if c.max_skips == 0 or b.consecutive >= c.max_skips:
            return "max-skips"
        need = self._min_history
        if b.history.count < need:
            return "history"
        if c.policy == "tsi":
            last = b.last_values
            tsi = tsi_from_sums(last) if last is not None else math.nan
            return None if tsi <= c.tsi_threshold else "tsi"  # NaN never passes
        return None if b.run_left > 0 else "error"

    def _compute(self, b, h_in, k, t, reason, stage, probe, nonfinite=False):
        if probe:  # (b.last_values is current here whenever the paper predictor's flag needs it)
            cf = self._coef(b, stage, t, b.last_values)
            b.history.predict(h_in, cf, self.config.predictor, t, write_out=False, probe=True)
        b.pending = _Pending(k, t, reason, stage, probe, nonfinite)
        b.consecutive = 0
        return None

    def _skip(self, b, h_in, k, t, stage, guess=None):
        c = self.config
        if guess is not None:  # predicted and read before the decision
            out, sums, values = guess
        else:
            cf = self._coef(b, stage, t, b.last_values)
            out, sums = b.history.predict(h_in, cf, c.predictor, t, store=c.store_predictions)
            # The one wait a skip cannot avoid: never hand a non-finite prediction to the model.
            (values,) = self._finish_reads([self._start_read(sums)])
        if values[5] != 0.0:
            log.warning("tcpade: non-finite prediction at step %d: computing it instead", k)
            b.poisoned = True  # (a stored prediction's sums are garbage: they are not folded)
            return self._compute(b, h_in, k, t, "nonfinite", stage, probe=False, nonfinite=True)
        rec = StepRecord(k, t, False, "skip", stage)
        b._records.append(rec)
        if c.store_predictions:  # a history write, already read
            self._fold(b, _Write(rec, b.history.count, False, sums), values)
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
