"""The per-call decision: compute the block stack, or skip it and predict its residual.

``Runtime`` implements the adapter's Controller protocol. ``decide`` runs before the
transformer's forward (eager, outside any compiled region) and settles the call from k,
T, the config and the sums of earlier history writes, never from this call's tensors.
A skip hands the first block hook a ``Call``: the prediction from ``h_in``, tensor ops
only, so it traces inside a compiled block region. ``finish`` runs after the forward
(eager again): the probe and update passes of a computed call, the host bookkeeping of
both kinds, the step record.

The runtime only puts the pieces together; each job is its own module:

* ``clock.StepClock``: T of the run and the time of the call (and the warnings about T);
* ``plan.Resolved``: the user's config (``runtime.config``, the object given) beside what
  calibration resolved for the model, and the fixed plans;
* ``rule.Rule.reason(k, T, state)``: the host rule (warm-up, final and interval steps,
  max_skips, too little history), for the plans and for the live decision alike;
* ``reader.Reader``: the device sums to the host, only where asked;
* ``choosers``: the error policy's run of skips and the "auto" predictor's candidate;
* ``state``: the per-branch, per-thread state (``Branch``, ``Run``, ``StepRecord``).

A decision, in order (``decide``): the branch's run starts over when its previous call never
finished, the pipeline reset its hooks, or the time went back; without T, or past it, the call
is computed ("steps-unknown", "beyond-steps"); a caller's ``force`` computes it ("control").
Then:

* a run with a fixed plan (``config.plan(T)`` is not None: every preset but ``adaptive()``)
  computes the plan's steps ("schedule", or the rule's reason when the plan is the TSI rule's)
  and reads nothing from the device; a non-finite predicted element is replaced on the device
  by h_in + R1 and only reported after the run (``nonfinite``);
* otherwise ("tsi" with a threshold < 1, "error"): "nonfinite" once a non-finite value was
  read, else the rule's reason; when the rule lets the step be skipped, one read of the
  earlier writes' sums (the reader) and the one device-side question: the TSI of the newest
  write <= ``tsi_threshold`` ("tsi"), or the error policy's run of skips not used up
  ("error"). ``Runtime.host_reads`` counts the waits.
"""

from __future__ import annotations

import logging
import math
import struct
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core import coef as K
from ..core import layout as L
from ..core.history import History, Sums, coef_to_device
from .clock import StepClock
from .config import TCPadeConfig
from .plan import Resolved
from .reader import Reader
from .rule import Counts
from .state import Branch, Branches, Call, StepRecord

__all__ = ["RUNTIME_ATTR", "Runtime", "StepRecord", "attached_runtime"]

log = logging.getLogger(__name__)

RUNTIME_ATTR = "_tcpade_runtime"  # the attribute of a transformer that holds its Runtime


def attached_runtime(target) -> "Runtime":
    """The Runtime that ``tcpade.apply`` attached to a pipeline's or a bare transformer."""
    transformer = target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", None)
    rt = getattr(transformer, RUNTIME_ATTR, None)
    if rt is None:
        raise RuntimeError("tcpade is not applied to this transformer")
    return rt


class Runtime:
    """TC-Pade for one transformer: per-branch histories, the policy, the fused ops.

    config: the user's config (kept as given: ``runtime.config is config``). resolved: what
    ``tcpade.policy.schedules.resolve`` found for the model (calibrated schedules, the predictor
    of ``calibrated_predictor``); None: the config alone. total_steps / num_steps / clock: where
    T and the call's time come from (``tcpade.policy.clock``).
    """

    def __init__(self, config: Optional[TCPadeConfig] = None, total_steps: Optional[Callable[[], int]] = None,
                 num_steps: Optional[int] = None, clock: Optional[Callable[[], Optional[float]]] = None,
                 resolved: Optional[Resolved] = None):  # fmt: skip
        self.config = config if config is not None else TCPadeConfig()
        if not isinstance(self.config, TCPadeConfig):
            raise TypeError(f"config must be a TCPadeConfig, got {type(self.config).__name__}")
        self.resolved = resolved if resolved is not None else Resolved(self.config)
        if self.resolved.config is not self.config:
            raise ValueError("Runtime: resolved is for another config than the one given")
        self.steps = StepClock(total_steps, num_steps, clock)
        self.reader = Reader(self.resolved)
        self._branches = Branches(self._new_history)
        # Applied to the sums of every history write and prediction before they are read;
        # tcpade.distributed sets it to a reduction over the ranks that hold the other image
        # tokens (sequence parallelism), so that all ranks decide alike.
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        # Called at every decide (tcpade.apply: raises when another cache was enabled on the
        # transformer after tcpade, so that two caches never run at once).
        self.guard: Optional[Callable[[], None]] = None
        c, resolved = self.config, self.resolved
        # (a run's predictor is its calibrated schedule's or the config's: Resolved.predictor_for)
        gammas = [c.input_correction if c.input_correction is not None else K.default_gamma(p)
                  for p in resolved.predictors]  # fmt: skip
        self._keep_prev = any(float(g) != 0.0 for g in gammas)
        self.level = c.level  # what the adapter hands over: the block stack's h_in/h_out, or the output
        # TCPadeConfig.extrapolate "h_out": the history holds the stack's h_out (its inputs fed as
        # zero), and a skip returns the extrapolated h_out itself
        self.zero_input = c.level == "block" and c.extrapolate == "h_out"

    # ------------------------------------------------------- T, time, host reads
    @property
    def host_reads(self) -> int:
        """Times the host waited for device values (each a stream stall on CUDA): the sums a
        decision or ``read`` brought over, a tensor timestep read because no clock knew the
        step's time, and the clock's own copies of the schedule (one per sampling run)."""
        return self.reader.waits + self.steps.host_reads

    @property
    def clock(self) -> Optional[Callable[[], Optional[float]]]:
        """The current step's time from a host copy (the pipeline's scheduler), or None."""
        return self.steps.clock

    def clocked(self, clock: Callable[[], Optional[float]]):
        """Inside the block, ``clock`` gives the calls' time (a custom loop that knows its step's
        time); its ``reads``, if it counts any, are added to ``host_reads`` at the end."""
        return self.steps.clocked(clock)

    def step_time(self, timestep) -> Optional[float]:
        """The time of this call as a host float (``StepClock.time``)."""
        return self.steps.time(timestep)

    def set_steps(self, total: Optional[int]) -> None:
        """Fix T for the coming runs; None goes back to the scheduler / the declared num_steps."""
        self.steps.set_steps(total)

    @property
    def steps_override(self) -> Optional[int]:
        """The T fixed by ``set_steps``, or None."""
        return self.steps.override

    def total_steps(self) -> Optional[int]:
        return self.steps.total()[0]

    # ------------------------------------------------------------- branches
    @property
    def branches(self) -> Dict[str, Branch]:
        """The calling thread's branches (name -> state), or, in a thread that has made no
        call yet, those of the thread that made the latest one."""
        return self._branches.current()

    def read(self, branch: Optional[str] = None) -> None:
        """Bring the device sums of the current run of ``branch`` (None: of every branch in
        ``branches``) to the host and fold them into its records: one wait per branch with
        unread sums. Nothing else reads them outside a decision that needs them."""
        branches = self.branches
        for name in [branch] if branch is not None else list(branches):
            self.reader.read(branches[name], everything=True)

    def records(self, branch: str) -> List[StepRecord]:
        """The calls of ``branch``'s current run, their device sums read first (``read``)."""
        self.read(branch)
        return self.branches[branch].run.records

    @property
    def nbytes(self) -> int:
        """Bytes of the history buffers, over every thread that has made calls and still runs."""
        return sum(b.history.nbytes + sum(h.nbytes for h in b.experts.values()) for b in self._branches.every())

    def reset(self) -> None:
        """End the current sampling run of the calling thread: the next call of every branch
        starts a new one.

        (diffusers pipelines reset stateful hooks at the end of each call; the records of
        the run just finished stay readable through ``tcpade.summary`` until then.)"""
        for b in self._branches.of_this_thread():
            self._end_run(b)
            b.reset_pending = True

    def _new_history(self) -> History:
        return History(nslots=self.config.history_slots, keep_prev_input=self._keep_prev)

    def _end_run(self, b: Branch) -> None:
        """A run of ``b`` ended: say so if it was shorter than the T it was planned for."""
        total, k = b.run.total, b.run.k
        if total is not None and 0 < k < total and b.pending is None and not b.reset_pending:
            self.steps.warn_once("short", f"tcpade: a sampling run had {k} steps but was planned for {total} "
                                 f"(num_steps={total}): its last steps were not placed as final steps; pass the "
                                 "run's length (tcpade.apply(..., num_steps=) or runtime.set_steps)")  # fmt: skip

    # ------------------------------------------------------------- protocol
    def decide(self, branch: str, timestep, force: Optional[str] = None, expert: str = "") -> Optional[Call]:
        """Before the transformer's forward: None to compute the block stack, or the
        prediction (a ``Call``) that the first block hook runs on h_in to skip it.
        ``force``: a reason this call must be computed ("control": it carries ControlNet
        residuals), or None. ``expert``: which transformer of a multi-expert pipeline (Wan2.2)
        makes this call; each expert has its own history per branch, while the step index, T
        and the stages run over the whole sampling run."""
        if self.guard is not None:
            self.guard()
        b = self._branches.get(branch)
        if expert != b.expert:
            b.switch_expert(expert, self._new_history)
        t = self.steps.time(timestep) if isinstance(timestep, torch.Tensor) else float(timestep)
        total, declared = self.steps.total()
        if b.pending is not None:
            # The previous call never finished (an exception inside the forward): its probe
            # may have overwritten a slot, so start over.
            log.warning("tcpade: branch %r: the previous call did not finish; history reset", branch)
            b.new_run()
        elif b.reset_pending or b.run.restarted(t):
            self._end_run(b)
            b.new_run()
        run, c = b.run, self.config
        if total is None:
            self.steps.warn_once("unknown", "tcpade: the number of denoising steps is unknown (use tcpade.apply on "
                                 "the pipeline, or tcpade.apply(transformer, num_steps=T)): computing every step")
            return self._compute(b, t, "steps-unknown", "middle")
        if run.k >= total:
            # A run longer than planned: continue it (no silent restart), computing every extra step.
            self.steps.warn_once("long", f"tcpade: the sampling run is longer than the {total} steps it was planned "
                                 f"for (step {run.k + 1} of num_steps={total}): computing every step from here; pass "
                                 "the run's length (tcpade.apply(..., num_steps=) or runtime.set_steps)")  # fmt: skip
            return self._compute(b, t, "beyond-steps", "late")
        if run.k == 0:
            self._settle(run, total, declared)
        stage = K.stage_of(run.k, total, c.early_frac, c.late_frac)
        reason = force if force is not None else self._reason(b, total)
        if reason is not None:
            return self._compute(b, t, reason, stage, self._probes(b))
        variant, auto = self._predictor(b)
        coef = self._coef(b, stage, self._axis(run.k, t), rows=auto)[0]
        if auto:
            coef = b.auto.select(coef)  # the candidate chosen so far (a row of every candidate's)
        b.pending = Call(run.k, t, None, stage, b.history, variant, coef, c.store_predictions,
                         zero_input=self.zero_input)  # fmt: skip
        return b.pending

    def _settle(self, run, total: int, declared: bool) -> None:
        """What a run fixes at its step 0: the run's times, its plan (None: decided call by call),
        where the plan comes from, the predictor, and the step count it was declared for."""
        run.times = self.steps.run_times(total)
        plan = self.resolved.plan(total, run.times)
        run.planned, run.plan = plan is not None, frozenset(plan or ())
        run.fixed_rule = plan is not None and self.resolved.plan_source(total, run.times) == "fixed rule"
        run.predictor = self.resolved.predictor_for(total, run.times)
        run.total = total if declared else None  # only a declared num_steps can be wrong about a run

    def finish(self, branch: str, h_in: Optional[torch.Tensor], h_out: Optional[torch.Tensor]) -> None:
        """After the forward: ``h_in`` and ``h_out`` of a computed call (store R = h_out - h_in;
        at output level ``h_in`` is None and ``h_out`` the transformer's output), both None for a
        skipped one."""
        b = self.branches.get(branch)
        p = b.pending if b is not None else None
        if p is None:
            raise RuntimeError(f"tcpade: finish() for branch {branch!r} without a matching decide()")
        b.pending = None
        if h_out is None:
            if p.reason is not None or p.sums is None:
                raise RuntimeError(f"tcpade: branch {branch!r}: a computed call finished without h_in / h_out")
            rec = StepRecord(p.k, p.t, False, "skip", p.stage, sums=Sums(p.sums, self.reduce))
            b.history.advance(self._axis(p.k, p.t), wrote=p.store)
            if p.store:
                rec.stored, b.run.newest = b.history.count, rec
            self._recorded(b, rec)
            b.errors.skipped()
            return
        # A skip that computed after all (its prediction could not be made for this call), or
        # another shape mid-run: a new run.
        if p.reason is None or (b.run.k > 0 and not b.history.matches(h_out if h_in is None else h_in)):
            log.info("tcpade: branch %r: hidden-state shape/dtype/device changed; new run", branch)
            b.new_run()
            (total, declared), c = self.steps.total(), self.config
            if not total:
                reason = "steps-unknown"
            else:
                self._settle(b.run, total, declared)  # like any run at its step 0, which this call is
                reason = self._reason(b, total)  # as decide() says of step 0 (no device read: step 0 is forced)
            p = Call(0, p.t, reason,
                     K.stage_of(0, total, c.early_frac, c.late_frac) if total else "middle", b.history,
                     self._predictor(b)[0])  # fmt: skip
        x = None if self.zero_input else h_in  # what the history is fed as the input
        if p.probe:
            b.history.predict(x, p.coef, p.variant, write_out=False, probe=True)
        sums = b.history.record(x, h_out, probe=p.probe)
        b.history.advance(self._axis(p.k, p.t), wrote=True)
        reduce, chosen = self.reduce, None
        if p.choose:
            if reduce is not None:  # every rank chooses from the sums of the whole sequence
                sums, reduce = reduce(sums), None
            self._join(b, p.k, p.t)
            chosen = b.auto.probed(sums, p.lam1, p.tau1)
        rec = StepRecord(p.k, p.t, True, p.reason, p.stage, sums=Sums(sums, reduce, chosen), stored=b.history.count,
                         probed=p.probe, lam1=p.lam1, tau1=p.tau1, choose=p.choose)  # fmt: skip
        b.run.newest = rec
        self._recorded(b, rec)

    # ------------------------------------------------------------ the decision
    def _reason(self, b: Branch, total: int) -> Optional[str]:
        """Why this call of ``b`` is computed; None: skip it."""
        run, plan = b.run, self.resolved
        k = run.k
        if run.planned:
            if k in run.plan:
                # a schedule or a budget decides every step itself; the TSI rule's plan keeps its reasons
                if not run.fixed_rule:
                    return "schedule"
                return plan.rule.reason(k, total, Counts(run.skipped, b.history.count)) or "schedule"
            # (a plan never skips a step the history cannot predict; this guards an explicit one)
            return "history" if b.history.count < K.MIN_HISTORY[self._run_predictor(b)] else None
        if run.poisoned:
            return "nonfinite"
        reason = plan.rule.reason(k, total, Counts(run.skipped, b.history.count))
        if reason is None:
            self.reader.read(b)  # the one wait: this decision needs the sums of earlier writes
            reason = "nonfinite" if run.poisoned else self._device_reason(b)
        return reason

    def _device_reason(self, b: Branch) -> Optional[str]:
        """Why this call is computed, from the (read) sums of earlier writes; None: skip."""
        c = self.config
        if c.policy == "tsi":
            tsi = b.run.newest.tsi if b.run.newest is not None else math.nan
            return None if tsi <= c.tsi_threshold else "tsi"  # NaN never passes
        return None if b.errors.left > 0 else "error"

    def _probes(self, b: Branch) -> bool:
        """Does this computed call first predict itself? The error policy measures its probe
        error; "auto" measures its candidates (also on a fixed plan, where the error policy
        measures nothing). A probe measures an extrapolation: two residuals stored (with one, every
        predictor but the paper's predicts it as reuse does; reuse itself probes from one)."""
        count, run, p = b.history.count, b.run, self._run_predictor(b)
        measure = (self._predictor(b)[1] and count >= 3) or (self.config.policy == "error" and not run.planned)
        return measure and not run.poisoned and count >= max(K.MIN_HISTORY[p], 1 if p == "reuse" else 2)

    def _compute(self, b: Branch, t: float, reason: str, stage: str, probe: bool = False) -> None:
        coef, lam1, tau1 = self._coef(b, stage, self._axis(b.run.k, t)) if probe else (None, 0.0, 0.0)
        variant, auto = self._predictor(b)
        b.pending = Call(b.run.k, t, reason, stage, b.history, variant, coef, probe=probe, lam1=lam1,
                         tau1=tau1, choose=auto and probe)  # fmt: skip
        return None

    def _join(self, b: Branch, k: int, t: float) -> None:
        """Predictor "auto": the branches of one step (CFG's cond and uncond, called one after the
        other) choose together: ``b`` takes the ``AutoChoice`` of a branch of this thread that
        already chose at this very call of the run (its newest record: this step k at this time t,
        on the same expert; not a branch left over from an earlier run), so that their errors are
        summed and the next skips of both use one candidate. When cond and uncond pick differently
        their errors stop cancelling in cond + g (cond - uncond) (docs/method.md section 6)."""
        for o in self.branches.values():
            last = o.run.records[-1] if o.run.records else None
            if (o is not b and o.auto is not b.auto and o.expert == b.expert and not o.reset_pending
                    and o.auto.index is not None and last is not None and last.choose and last.k == k
                    and last.t == t):  # fmt: skip
                b.auto = o.auto
                return

    def _run_predictor(self, b: Branch) -> str:
        """The predictor of ``b``'s current run (``Resolved.predictor_for`` its T; a run whose T is
        unknown computes every call, and its records name the config's predictor)."""
        return b.run.predictor if b.run.predictor is not None else self.config.predictor

    def _predictor(self, b: Branch) -> Tuple[str, bool]:
        """(the kernel variant that runs, whether the candidate is chosen online) of ``b``'s run."""
        p = self._run_predictor(b)
        return L.kernel_variant(p), p in L.CHOOSERS

    @staticmethod
    def _recorded(b: Branch, rec: StepRecord) -> None:
        run = b.run
        run.records.append(rec)
        run.k += 1
        run.skipped = 0 if rec.computed else run.skipped + 1

    def _axis(self, k: int, t: float) -> float:
        """The time a prediction extrapolates along (``TCPadeConfig.time_axis``): the step index k
        ("index") or the scheduler's time t ("schedule")."""
        return float(k) if self.config.time_axis == "index" else t

    def _coef(self, b: Branch, stage: str, t: float, rows: bool = False) -> Tuple[torch.Tensor, float, float]:
        """The prediction's coefficient tensor (device; ``rows``: every "auto" candidate's, one
        row each), and its linear weight on R2 and R2's normalised time (host, as the device
        holds them: float32)."""
        c = self.config
        kw = dict(delta=c.pole_delta, kappa=c.kappa)
        if c.input_correction is not None:
            kw["gamma"] = c.input_correction
        predictor = self._run_predictor(b)
        if c.damping and predictor in ("rational", "linear"):  # (not a calibrations' reuse)
            kw["damping"] = c.damping
        values = b.history.coef_values(L.kernel_variant(predictor), stage, t, **kw)
        coef = coef_to_device(K.candidate_rows(values) if rows else values, b.history.ring.device)
        lam1, tau1 = (struct.unpack("f", struct.pack("f", values[i]))[0] for i in (K.LAM1, K.TAU1))
        return coef, lam1, tau1
