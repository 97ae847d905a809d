"""The per-call decision: compute the block stack, or skip it and predict its residual.

``Runtime`` implements the adapter's Controller protocol. ``decide`` runs before the
transformer's forward (eager, outside any compiled region) and settles the call from k,
T, the config and the sums of earlier history writes, never from this call's tensors.
A skip hands the first block hook a ``_Call``: the prediction from ``h_in``, tensor ops
only, so it traces inside a compiled block region. ``finish`` runs after the forward
(eager again): the probe and update passes of a computed call, the host bookkeeping of
both kinds, the step record.

Fixed schedules. When ``config.plan(T)`` returns the computed steps (every preset but
``adaptive()``), a run reads nothing from the device: the decisions are the plan. A
non-finite predicted element is replaced on the device by h_in + R1 (R1 where finite, else
0) and counted in the prediction's sums; the summary reports those steps after the run
(``nonfinite``), and a non-finite computed step changes no decision either.

Trajectory-dependent policies (``plan`` is None). The host first tries to settle a call
without the device (``_host_reason``: warm-up, interval and final steps, max_skips, too
little history, a non-finite trajectory already known); only when that leaves the call
open does it bring the sums of the earlier writes to the host (one wait for all of them,
``_fold``) and ask the one device-side question (``_device_reason``: the TSI of the
newest write, or whether the error policy's run of skips is used up). The decisions are
exactly those of reading every write at the next call: an unread write can only change
the decision of a call that reads it, and a non-finite value found late relabels the
calls it would have forced ("nonfinite"). ``Runtime.host_reads`` counts the waits.

Policies (TCPadeConfig.policy):

* "tsi" (the paper): steps 0..warmup, every interval-th step and the final step(s) are
  computed; any other step is skipped while enough residuals are stored, the TSI of the
  newest one passes (TSI <= tsi_threshold) and fewer than max_skips steps in a row were
  skipped.
* "error": at every computed step with enough history the predictor first predicts that
  step (a probe into the ring's free slot), the update pass then measures
  e = ||R_hat - R|| / ||R||, and the next run of skipped steps is sized from e against
  the tolerance like an ODE solver's step: e <= tol/2 -> one step longer, e <= tol -> the
  same (at least one), e <= 2 tol -> one shorter, else none; capped by max_skips.

Predictor "auto" (``tcpade.core.layout.CHOOSERS``): every computed call with enough history
probes the rational prediction of itself (one memory pass), and the update's sums give the
error the linear extrapolation would have made, ||d2 + lam1 d1||^2 with d1 = R1 - R2,
d2 = R - R1 and lam1 the linear weight on R2 (no pass of its own). The next skipped calls of
that branch use the candidate whose relative errors, summed over the run's computed steps so
far, are smaller, as a device-side coefficient value (the
rational kernel with its pole term off is the linear extrapolation): no host wait, so fixed
schedules keep reading nothing during the run. The summary shows each choice.

With a trajectory-dependent policy a non-finite value (a computed h_out, or a
prediction's fallback, read together with the next history write) forces full computation
for the rest of that branch's run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core import coef as K
from ..core import layout as L
from .config import TCPadeConfig
from ..core.history import History, Sums, coef_to_device
from ..core.reference import tsi_from_sums

log = logging.getLogger(__name__)

RUNTIME_ATTR = "_tcpade_runtime"  # the attribute of a transformer that holds its Runtime
_PLANS_KEPT = 16  # plans (computed steps per T) a Runtime keeps


def attached_runtime(target) -> "Runtime":
    """The Runtime that ``tcpade.apply`` attached to a pipeline's or a bare transformer."""
    transformer = target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", None)
    rt = getattr(transformer, RUNTIME_ATTR, None)
    if rt is None:
        raise RuntimeError("tcpade is not applied to this transformer")
    return rt


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside torch,
    diffusers and tcpade (the user's line that called the pipeline or the transformer)."""
    dirs = tuple(os.path.dirname(os.path.abspath(sys.modules[n].__file__)) + os.sep
                 for n in ("torch", "diffusers", __package__.split(".")[0]) if n in sys.modules)  # fmt: skip
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


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
    nonfinite: bool = False  # non-finite values at this call (a skip: its prediction fell back to h_in + R1)
    # This call's device sums (its history write, or its prediction), filled in above once read.
    sums: Optional[Sums] = field(default=None, repr=False, compare=False)
    stored: int = field(default=0, repr=False, compare=False)  # residuals stored after this call's write (0: none)
    probed: bool = field(default=False, repr=False, compare=False)  # the update measured a probe prediction
    choice: str = ""  # predictor "auto": the candidate the following skips use (filled in once read)
    lam1: float = field(default=0.0, repr=False, compare=False)  # the probe's linear weight on R2
    choose: bool = field(default=False, repr=False, compare=False)  # "auto" chose from this probe


@dataclass
class _Call:
    """One call between ``decide`` and ``finish``; a skip's ``_Call`` is the prediction the
    first block hook runs (traced: tensors and custom ops only, no host state changes)."""

    k: int
    t: float
    reason: Optional[str]  # why it is computed; None: skipped
    stage: str
    history: History
    variant: str
    coef: Optional[torch.Tensor] = None  # a skip's or a probe's coefficients (device)
    store: bool = False  # a skip stores its prediction in the history
    probe: bool = False  # a computed call measures a probe prediction
    sums: Optional[torch.Tensor] = None  # the skip's prediction sums (device)
    lam1: float = 0.0  # a probe's linear weight on R2 (predictor "auto" measures linear with it)
    choose: bool = False  # predictor "auto": this probe chooses the candidate of the next skips

    def __call__(self, h_in: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if h_in is None:  # output level: the transformer's output is its own residual (h_in = 0)
            h_in = self.history.zero
            if h_in is None:
                return None
        if not self.history.matches(h_in):
            return None  # another shape, dtype or device than the history's: compute this call
        out, self.sums = self.history.predict(h_in, self.coef, self.variant, store=self.store)
        return out


@dataclass
class BranchState:
    history: History
    k: int = 0
    run: int = 0  # error policy: planned length of the next run of skips
    run_left: int = 0
    consecutive: int = 0
    poisoned: bool = False
    pending: Optional[_Call] = None  # the call between decide and finish
    newest: Optional[StepRecord] = None  # the record of the newest history write
    folded: int = 0  # records whose sums have been folded into this state
    planned: bool = False  # this run follows a fixed plan
    total: Optional[int] = None  # the declared num_steps this run was started with (None: T was known)
    _records: List[StepRecord] = field(default_factory=list)
    runs: int = 0  # sampling runs started
    reset_pending: bool = False
    fold: Optional[Callable[["BranchState"], None]] = field(default=None, repr=False)
    choice: Optional[torch.Tensor] = None  # predictor "auto": the coefficient mask of the chosen candidate
    choice_err: Optional[torch.Tensor] = None  # "auto": the candidates' accumulated relative errors (device)
    choice_err_host: Tuple[float, float] = (0.0, 0.0)  # the same, from the records read so far
    expert: str = ""  # the expert whose history ``history`` is (multi-expert pipelines)
    experts: Dict[str, History] = field(default_factory=dict)  # the other experts' histories

    @property
    def records(self) -> List[StepRecord]:
        """The calls of the current run, their sums brought to the host first."""
        if self.fold is not None:
            self.fold(self)
        return self._records

    def new_run(self) -> None:
        self.reset_pending = False
        self.history.reset()
        self.k = self.run = self.run_left = self.consecutive = self.folded = 0
        self.poisoned = self.planned = False
        self.pending = self.newest = self.total = self.choice = self.choice_err = None
        self.choice_err_host = (0.0, 0.0)
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
            # One record (or a constant schedule) gives no direction yet: assuming diffusers'
            # decreasing one here would make every increasing schedule restart at step 1.
            return False
        return (t - t_last) * (t_last - t0) < 0




class Runtime:
    """TC-Pade for one transformer: per-branch histories, the policy, the fused ops.

    total_steps: a callable returning T for the current sampling run when it can be known
    (the length of the pipeline scheduler's timesteps), or None. num_steps: T as declared
    by the user (``tcpade.apply(..., num_steps=)``), used when ``total_steps`` gives none;
    ``set_steps`` overrides both (``tcpade.sample`` sets the length of its own run). Without
    any T every call is computed (with one warning): stages and the final steps cannot be
    placed, and full computation is always safe.
    """

    def __init__(self, config: Optional[TCPadeConfig] = None, total_steps: Optional[Callable[[], int]] = None,
                 num_steps: Optional[int] = None, clock: Optional[Callable[[], Optional[float]]] = None):  # fmt: skip
        self.config = config or TCPadeConfig()
        if not isinstance(self.config, TCPadeConfig):
            raise TypeError(f"config must be a TCPadeConfig, got {type(self.config).__name__}")
        self._total_steps_fn = total_steps
        self._total: Optional[int] = None
        self._declared = _check_steps("num_steps", num_steps)
        self._warned: set = set()
        # The branches (histories, step records) belong to the thread that makes the calls: two
        # pipelines that share this transformer (``Pipeline.from_pipe``) can run in two threads at
        # once, each with its own histories. ``branches`` is the calling thread's, or, in a thread
        # that has made no call, those of the thread that called last (a summary read elsewhere).
        self._threads: "weakref.WeakKeyDictionary[threading.Thread, Dict[str, BranchState]]" = (
            weakref.WeakKeyDictionary())
        self._threads_lock = threading.Lock()
        self._latest: Dict[str, BranchState] = {}
        # Applied to the sums of every history write and prediction before they are read;
        # tcpade.distributed sets it to a reduction over the ranks that hold the other image
        # tokens (sequence parallelism), so that all ranks decide alike.
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._reads = 0  # times the host waited for device values (each a stream stall on CUDA)
        # The current step's time from a host copy (the pipeline's scheduler), or None: then a
        # tensor timestep is read at every call.
        self.clock = clock
        # Called at every decide (tcpade.apply: raises when another cache was enabled on the
        # transformer after tcpade, so that two caches never run at once).
        self.guard: Optional[Callable[[], None]] = None
        self._plans: Dict[int, Optional[Tuple[int, ...]]] = {}
        c = self.config
        gamma = c.input_correction if c.input_correction is not None else K.default_gamma(c.predictor)
        self._keep_prev = float(gamma) != 0.0
        self._variant = L.kernel_variant(c.predictor)  # what the kernels run
        self.level = c.level  # what the adapter hands over: the block stack's h_in/h_out, or the output
        self._auto = c.predictor in L.CHOOSERS  # the candidate is chosen online

    # ------------------------------------------------------------------ plumbing
    @property
    def host_reads(self) -> int:
        """Times the host waited for device values (each a stream stall on CUDA): the sums a
        decision or the summary read, a tensor timestep read because no clock knew the step's
        time, and the clock's own copies of the schedule (one per sampling run)."""
        return self._reads + getattr(self.clock, "reads", 0)

    @contextlib.contextmanager
    def clocked(self, clock: Callable[[], Optional[float]]):
        """Inside the block, ``clock`` gives the calls' time (a custom loop that knows its step's
        time); its ``reads``, if it counts any, are added to ``host_reads`` at the end."""
        prev, self.clock = self.clock, clock
        try:
            yield
        finally:
            self._reads += getattr(clock, "reads", 0)
            self.clock = prev

    def step_time(self, timestep) -> Optional[float]:
        """The time of this call as a host float: the clock's where it knows it (no device
        read), else the ``timestep`` argument's first element (a tensor: one host read)."""
        if self.clock is not None:
            t = self.clock()
            if t is not None:
                return t
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise ValueError("the transformer was called with an empty timestep tensor")
            self._reads += 1
            return float(timestep.reshape(-1)[0])
        return None if timestep is None else float(timestep)

    def set_steps(self, total: Optional[int]) -> None:
        """Fix T for the coming runs; None goes back to the scheduler / the declared num_steps."""
        self._total = _check_steps("total steps", total)

    @property
    def steps_override(self) -> Optional[int]:
        """The T fixed by ``set_steps``, or None."""
        return self._total

    def total_steps(self) -> Optional[int]:
        if self._total is not None:
            return self._total
        real = self._total_steps_fn() if self._total_steps_fn is not None else None
        real = int(real) if real else None
        if real is not None:
            if self._declared is not None and real != self._declared:
                self._warn_once("declared", f"tcpade: num_steps={self._declared} was given, but the pipeline's "
                                f"scheduler runs {real} steps: using {real}")  # fmt: skip
            return real
        return self._declared

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=_caller_stacklevel())

    def _plan(self, total: int) -> Optional[Tuple[int, ...]]:
        plans = self._plans
        if total not in plans:
            if len(plans) >= _PLANS_KEPT:  # a server's step counts vary per request: keep the newest few
                plans.pop(next(iter(plans)), None)
            plans[total] = self.config.plan(total)
        return plans[total]

    @property
    def branches(self) -> Dict[str, BranchState]:
        """The calling thread's branches (name -> state), or, in a thread that has made no
        call yet, those of the thread that made the latest one."""
        own = self._threads.get(threading.current_thread())
        return own if own is not None else self._latest

    def _own_branches(self) -> Dict[str, BranchState]:
        thread = threading.current_thread()
        own = self._threads.get(thread)
        if own is None:
            with self._threads_lock:
                own = self._threads.setdefault(thread, {})
        self._latest = own
        return own

    def reset(self) -> None:
        """End the current sampling run of the calling thread: the next call of every branch
        starts a new one.

        (diffusers pipelines reset stateful hooks at the end of each call; the records of
        the run just finished stay readable through ``tcpade.summary`` until then.)"""
        for b in self._threads.get(threading.current_thread(), {}).values():
            self._end_run(b)
            b.reset_pending = True

    def _end_run(self, b: BranchState) -> None:
        """A run of ``b`` ended: say so if it was shorter than the T it was planned for."""
        total = b.total
        if total is not None and 0 < b.k < total and b.pending is None and not b.reset_pending:
            self._warn_once("short", f"tcpade: a sampling run had {b.k} steps but was planned for {total} "
                            f"(num_steps={total}): its last steps were not placed as final steps; pass the "
                            "run's length (tcpade.apply(..., num_steps=) or runtime.set_steps)")  # fmt: skip

    def _branch(self, name: str) -> BranchState:
        branches = self._own_branches()
        b = branches.get(name)
        if b is None:
            b = BranchState(History(nslots=self.config.history_slots, keep_prev_input=self._keep_prev))
            b.fold = lambda branch: self._fold(branch, everything=True)
            branches[name] = b
        return b

    @property
    def nbytes(self) -> int:
        """Bytes of the history buffers, over every thread that has made calls and still runs."""
        with self._threads_lock:
            states = list(self._threads.values())
        return sum(b.history.nbytes + sum(h.nbytes for h in b.experts.values())
                   for branches in states for b in branches.values())  # fmt: skip

    def _switch_expert(self, b: "BranchState", expert: str) -> None:
        """Make ``expert``'s history the branch's history. Its residuals are not comparable with
        the other expert's, so it starts empty, allocated like the one it replaces (the two
        experts of a pipeline share the hidden-state shape); the records keep their own sums,
        so the writes made so far are still read into them."""
        old = b.history
        b.experts[b.expert] = old
        history = b.experts.pop(expert, None)
        if history is None:
            history = History(nslots=self.config.history_slots, keep_prev_input=self._keep_prev)
        if old.ring is not None:
            history.ensure(old.ring[0])
        history.reset()
        b.history, b.expert = history, expert
        b.newest = b.choice = b.choice_err = None
        b.choice_err_host = (0.0, 0.0)
        b.run = b.run_left = 0

    # ------------------------------------------------------------------- protocol
    def decide(self, branch: str, timestep, force: Optional[str] = None, expert: str = "") -> Optional[_Call]:
        """Before the transformer's forward: None to compute the block stack, or the
        prediction (a ``_Call``) that the first block hook runs on h_in to skip it.
        ``force``: a reason this call must be computed ("control": it carries ControlNet
        residuals), or None. ``expert``: which transformer of a multi-expert pipeline (Wan2.2)
        makes this call; each expert has its own history per branch, while the step index, T
        and the stages run over the whole sampling run."""
        if self.guard is not None:
            self.guard()
        b = self._branch(branch)
        if expert != b.expert:
            self._switch_expert(b, expert)
        t = self.step_time(timestep) if isinstance(timestep, torch.Tensor) else float(timestep)
        total = self.total_steps()
        if b.pending is not None:
            # The previous call never finished (an exception inside the forward): its probe
            # may have overwritten a slot, so start over.
            log.warning("tcpade: branch %r: the previous call did not finish; history reset", branch)
            b.new_run()
        elif b.reset_pending or b.restarted(t):
            self._end_run(b)
            b.new_run()
        k, c = b.k, self.config
        if total is None:
            self._warn_once("unknown", "tcpade: the number of denoising steps is unknown (use tcpade.apply on the "
                            "pipeline, or tcpade.apply(transformer, num_steps=T)): computing every step")  # fmt: skip
            return self._pend(b, k, t, "steps-unknown", "middle")
        if k >= total:
            # A run longer than planned: continue it (no silent restart), computing every extra step.
            self._warn_once("long", f"tcpade: the sampling run is longer than the {total} steps it was planned for "
                            f"(step {k + 1} of num_steps={total}): computing every step from here; pass the "
                            "run's length (tcpade.apply(..., num_steps=) or runtime.set_steps)")  # fmt: skip
            return self._pend(b, k, t, "beyond-steps", "late")
        if k == 0:
            b.planned = self._plan(total) is not None
            guessed = self._total is None and not (self._total_steps_fn is not None and self._total_steps_fn())
            b.total = total if guessed else None  # only a declared num_steps can be wrong about a run
        stage = K.stage_of(k, total, c.early_frac, c.late_frac)
        if force is not None:
            reason = force
        elif b.planned:
            if k in self._plan(total):
                # a schedule or a budget decides every step itself; the TSI rule's plan keeps its reasons
                rule = c.schedule is None and c.budget_passes(total) is None
                reason = (self._host_reason(b, k, total) if rule else None) or "schedule"
            else:  # (a plan never skips a step the history cannot predict; this guards an explicit one)
                reason = "history" if b.history.count < K.MIN_HISTORY[c.predictor] else None
        else:
            reason = "nonfinite" if b.poisoned else self._host_reason(b, k, total)
            if reason is None:
                self._fold(b)  # the one wait: this decision needs the sums of earlier writes
                reason = "nonfinite" if b.poisoned else self._device_reason(b)
        if reason is not None:
            # The error policy measures its probe error; "auto" measures its candidates (also on a
            # fixed plan, where the error policy measures nothing).
            probe = (((self._auto and b.history.count >= 3) or (c.policy == "error" and not b.planned))
                     and not b.poisoned and b.history.count >= K.MIN_HISTORY[c.predictor])  # fmt: skip
            return self._pend(b, k, t, reason, stage, probe)
        coef = self._coef(b, stage, t)[0]
        if b.choice is not None:
            coef = coef * b.choice
        b.pending = _Call(k, t, None, stage, b.history, self._variant, coef, c.store_predictions)
        return b.pending

    def finish(self, branch: str, h_in: Optional[torch.Tensor], h_out: Optional[torch.Tensor]) -> None:
        """After the forward: ``h_in`` and ``h_out`` of a computed call (store R = h_out - h_in;
        at output level ``h_in`` is None and ``h_out`` the transformer's output), both None for a
        skipped one."""
        b = self.branches.get(branch)
        p = b.pending if b is not None else None
        if p is None:
            raise RuntimeError(f"tcpade: finish() for branch {branch!r} without a matching decide()")
        b.pending = None
        c = self.config
        if h_out is None:
            if p.reason is not None or p.sums is None:
                raise RuntimeError(f"tcpade: branch {branch!r}: a computed call finished without h_in / h_out")
            rec = StepRecord(p.k, p.t, False, "skip", p.stage, sums=Sums(p.sums, self.reduce))
            b.history.advance(p.t, wrote=p.store)
            if p.store:
                rec.stored, b.newest = b.history.count, rec
            b._records.append(rec)
            b.k += 1
            b.consecutive += 1
            b.run_left = max(0, b.run_left - 1)
            return
        if h_in is None:  # output level: R = the output
            h_in = b.history.zero_for(h_out)
        # A skip that computed after all (its prediction could not be made for this call), or
        # another shape mid-run: a new run.
        if p.reason is None or (b.k > 0 and not b.history.matches(h_in)):
            log.info("tcpade: branch %r: hidden-state shape/dtype/device changed; new run", branch)
            b.new_run()
            total = self.total_steps()
            p = _Call(0, p.t, c.always_computed(0, total) if total else "steps-unknown",
                      K.stage_of(0, total, c.early_frac, c.late_frac) if total else "middle", b.history,
                      self._variant)  # fmt: skip
        if p.probe:
            b.history.predict(h_in, p.coef, self._variant, write_out=False, probe=True)
        sums = b.history.record(h_in, h_out, probe=p.probe)
        b.history.advance(p.t, wrote=True)
        reduce = self.reduce
        if p.choose:
            if reduce is not None:  # every rank chooses from the sums of the whole sequence
                sums, reduce = reduce(sums), None
            b.choice, b.choice_err = _choice_mask(sums, p.coef, b.choice_err)
        rec = StepRecord(p.k, p.t, True, p.reason, p.stage, sums=Sums(sums, reduce), stored=b.history.count,
                         probed=p.probe, lam1=p.lam1, choose=p.choose)  # fmt: skip
        b._records.append(rec)
        b.newest = rec
        b.k += 1
        b.consecutive = 0

    # ------------------------------------------------------------------- internals
    def _pend(self, b: BranchState, k: int, t: float, reason: str, stage: str, probe: bool = False) -> None:
        coef, lam1, distinct = self._coef(b, stage, t) if probe else (None, 0.0, False)
        # "auto" chooses only where its candidates differ: with fewer than three residuals (or a
        # degenerate grid) the rational prediction is the linear one.
        b.pending = _Call(k, t, reason, stage, b.history, self._variant, coef, probe=probe, lam1=lam1,
                          choose=self._auto and probe and distinct)  # fmt: skip
        return None

    @property
    def _min_history(self) -> int:
        """Stored residuals a skip needs: the predictor's minimum, and three for a TSI that can
        block (threshold < 1). A TSI that never blocks needs no third residual: on the trained
        zoo models waiting for one cost the evenly spaced 8-of-20 schedule (0, 1, 3, 6, .., 18)."""
        c = self.config
        if c.policy == "tsi" and c.tsi_threshold < 1.0:
            return max(3, K.MIN_HISTORY[c.predictor])
        return K.MIN_HISTORY[c.predictor]

    def _host_reason(self, b: BranchState, k: int, total: int) -> Optional[str]:
        """Why this call is computed, decided on the host alone (None: the host cannot tell)."""
        c = self.config
        forced = c.always_computed(k, total)
        if forced:
            return forced
        if c.max_skips == 0 or b.consecutive >= c.max_skips:
            return "max-skips"
        if b.history.count < self._min_history:
            return "history"
        return None

    def _device_reason(self, b: BranchState) -> Optional[str]:
        """Why this call is computed, from the (folded) sums of earlier writes; None: skip."""
        if self.config.policy == "tsi":
            tsi = b.newest.tsi if b.newest is not None else math.nan
            return None if tsi <= self.config.tsi_threshold else "tsi"  # NaN never passes
        return None if b.run_left > 0 else "error"

    def _fold(self, b: BranchState, everything: bool = False) -> None:
        """Bring the sums of the unread records of ``b`` to the host (one wait) and fold them,
        oldest first, into the branch state: TSI and probe error on each record, poisoning on
        a non-finite value, the error policy's run length. Only a history write can change a
        decision, so without ``everything`` (the summary's read) nothing is read while the
        unread records are predictions that stored nothing."""
        todo = b._records[b.folded:]
        if not todo or not (everything or any(r.stored and not r.sums.read for r in todo)):
            return
        if any(not r.sums.read for r in todo):
            self._reads += 1
        for rec in todo:
            self._fold_one(b, rec)
        b.folded = len(b._records)

    def _fold_one(self, b: BranchState, rec: StepRecord) -> None:
        v = rec.sums.get()
        if not rec.computed and not rec.stored:  # a prediction that wrote nothing: only its fallback counts
            if v.nonfinite != 0.0:
                self._poison(b, rec)
            return
        poisoned_before = b.poisoned
        if rec.stored >= 3:
            rec.tsi = tsi_from_sums(v)
        # Non-finite values written at this call (a stale NaN further back in the history
        # only turns the TSI into NaN, which blocks skipping by itself).
        if v.nonfinite != 0.0 or not (math.isfinite(v.r2) and math.isfinite(v.nonfinite)):
            self._poison(b, rec)
        if poisoned_before:
            if rec.computed and not b.planned:
                rec.reason = "nonfinite"  # read at once, this call would have been computed as "nonfinite"
        elif rec.probed:
            rec.error = math.sqrt(v.err2 / v.r2) if v.r2 > 0 else math.nan
            if rec.choose:  # the rule of _choice_mask, on the host values
                e_rat, e_lin = _candidate_errors(v.d11, v.d22, v.d12, v.err2, v.r2 if v.r2 > 0 else 1.0, rec.lam1)
                a_rat, a_lin = b.choice_err_host
                a_rat, a_lin = a_rat + e_rat, a_lin + e_lin
                b.choice_err_host = (a_rat, a_lin)
                linear = a_lin < a_rat
                rec.choice = L.CHOOSERS[self.config.predictor][1 if linear else 0]
                if linear:
                    rec.error = math.sqrt(max(e_lin, 0.0)) if v.r2 > 0 else math.nan
            if self.config.policy == "error" and not b.planned:
                self._size_run(b, rec.error)

    def _poison(self, b: BranchState, rec: StepRecord) -> None:
        rec.nonfinite = True
        if not b.poisoned:
            what = "computing from now on" if not b.planned else "predictions fall back to h_in + R1"
            log.warning("tcpade: non-finite values in the trajectory at step %d: %s", rec.k, what)
        b.poisoned = True

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

    def _coef(self, b: BranchState, stage: str, t: float) -> Tuple[torch.Tensor, float, bool]:
        """The prediction's coefficient tensor (device), its linear weight on R2 (host), and
        whether its rational term is on (the pole bound is not 0)."""
        c = self.config
        kw = dict(delta=c.pole_delta, kappa=c.kappa)
        if c.input_correction is not None:
            kw["gamma"] = c.input_correction
        values = b.history.coef_values(self._variant, stage, t, **kw)
        coef = coef_to_device(values, b.history.ring.device)
        lam1 = struct.unpack("f", struct.pack("f", values[K.LAM1]))[0]  # as the device holds it (float32)
        return coef, lam1, values[K.BMAX] != 0.0


def _candidate_errors(d11, d22, d12, err2, r2, lam1):
    """Predictor "auto": the squared errors of rational (the probe's ``err2``) and of linear
    extrapolation (||d2 + lam1 d1||^2 = d22 + 2 lam1 d12 + lam1^2 d11) on one computed step,
    relative to ``r2`` = ||R||^2 (> 0). Floats (the host's records) or 0-d tensors (the device)."""
    lin2 = d22 + 2.0 * lam1 * d12 + lam1 * lam1 * d11
    return err2 / r2, lin2 / r2


def _choice_mask(sums: torch.Tensor, coef: torch.Tensor, acc: Optional[torch.Tensor]):
    """Predictor "auto", on the device: the coefficient mask of the candidate with the smaller
    error summed over the run's computed steps so far (``acc``: the sums before this step, or
    None), and the new sums. Per step, relative to ||R||^2: rational's squared error is the
    probe's ``err2``, linear's ||d2 + lam1 d1||^2 = d22 + 2 lam1 d12 + lam1^2 d11 (the update's
    sums; lam1 from the probe's coefficients). Linear is chosen only when strictly smaller (a
    NaN keeps rational); its mask zeroes the pole bound ``bmax``, which turns the rational
    kernel into linear extrapolation."""
    s = dict(zip(L.SUMS, sums.to(torch.float64)))
    r2 = torch.where(s["r2"] > 0, s["r2"], torch.ones_like(s["r2"]))
    e = _candidate_errors(s["d11"], s["d22"], s["d12"], s["err2"], r2, coef[K.LAM1].to(torch.float64))
    new = torch.stack(e)
    acc = new if acc is None else acc + new
    keep = (~(acc[1] < acc[0])).to(coef.dtype)
    mask = torch.ones_like(coef)
    mask[K.BMAX] = keep
    return mask, acc


def _check_steps(name: str, total) -> Optional[int]:
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
        raise ValueError(f"{name} must be an int > 0 or None, got {total!r}")
    return total
