"""What the runtime keeps per CFG branch, per thread: plain data, no references back.

* ``Branch``: one CFG branch of one thread: its residual history (one per expert of a
  multi-expert pipeline), the current ``Run``, the choosers' state, the call between
  ``decide`` and ``finish``.
* ``Run``: one sampling run of a branch as the host knows it: the step index, the skips in a
  row, the step records and how many of them have their device sums read.
* ``StepRecord``: one call, as the summary shows it. Its device sums (``sums``) are read into
  it by ``tcpade.policy.reader`` only where asked (``Runtime.read`` / ``Runtime.records``).
* ``Call``: one call between ``decide`` and ``finish``; a skip's is the prediction the first
  block hook runs.
* ``Branches``: the branches of each thread that makes calls.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..core.history import History, Sums
from .choosers import AutoChoice, ErrorSteps


@dataclass
class StepRecord:
    """One transformer call of one branch, as the summary shows it."""

    k: int
    t: float
    computed: bool
    reason: str
    stage: str
    tsi: float = math.nan  # TSI of the residual written at this call (NaN: not enough history, or not read)
    error: float = math.nan  # probe error of this call's prediction (error policy, "auto")
    nonfinite: bool = False  # non-finite values at this call (a skip: its prediction fell back to h_in + R1)
    # This call's device sums (its history write, or its prediction), read into the fields above
    # and below by the reader (``tcpade.policy.reader``), and what it needs to read them.
    sums: Optional[Sums] = field(default=None, repr=False, compare=False)
    stored: int = field(default=0, repr=False, compare=False)  # residuals stored after this call's write (0: none)
    probed: bool = field(default=False, repr=False, compare=False)  # the update measured a probe prediction
    choice: str = ""  # predictor "auto": the candidate the following skips use
    lam1: float = field(default=0.0, repr=False, compare=False)  # the probe's linear weight on R2
    tau1: float = field(default=0.0, repr=False, compare=False)  # the probe's normalised time of R2
    choose: bool = field(default=False, repr=False, compare=False)  # "auto" chose from this probe


@dataclass
class Call:
    """One call between ``decide`` and ``finish``; a skip's ``Call`` is the prediction the
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
    tau1: float = 0.0  # a probe's normalised time of R2 (predictor "auto": the damped candidates' weights)
    choose: bool = False  # predictor "auto": this probe chooses the candidate of the next skips
    zero_input: bool = False  # the history holds the stack's h_out (TCPadeConfig.extrapolate "h_out")

    def __call__(self, h_in: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if h_in is None:  # output level: the transformer's output is its own residual (h_in = 0)
            if self.history.ring is None:
                return None
        elif not self.history.matches(h_in):
            return None  # another shape, dtype or device than the history's: compute this call
        x = None if self.zero_input else h_in  # "h_out": the prediction is h_out itself
        out, self.sums = self.history.predict(x, self.coef, self.variant, store=self.store)
        return out


@dataclass
class Run:
    """One sampling run of one branch, as the host knows it."""

    k: int = 0  # the step index of the next call
    skipped: int = 0  # calls skipped in a row before it
    planned: bool = False  # the run follows a fixed plan (settled at step 0)
    total: Optional[int] = None  # the declared num_steps it started with (None: T came from elsewhere)
    records: List[StepRecord] = field(default_factory=list)  # its calls so far
    read: int = 0  # records[:read] have their sums read (``tcpade.policy.reader``)
    newest: Optional[StepRecord] = None  # the record of the newest history write
    poisoned: bool = False  # a non-finite value was read: trajectory policies compute from then on
    predictor: Optional[str] = None  # the predictor of this run (``Resolved.predictor_for``; None: not settled)
    times: Optional[tuple] = None  # the run's time per step where the clock knows them (the spaced rule's axis)
    plan: frozenset = frozenset()  # the computed steps of a planned run (settled at step 0, on ``times``)
    fixed_rule: bool = False  # the plan is the TSI rule's simulated one (its reasons are kept)

    def restarted(self, t: float) -> bool:
        """Does time t begin a new sampling run? (A run interrupted by an exception leaves
        k mid-way; the schedule's time going back says a new run started.)"""
        if not self.records:
            return False
        t0, t_last = self.records[0].t, self.records[-1].t
        if t == t0:
            return True
        if t_last == t0:
            # One record (or a constant schedule) gives no direction yet: assuming diffusers'
            # decreasing one here would make every increasing schedule restart at step 1.
            return False
        return (t - t_last) * (t_last - t0) < 0


@dataclass
class Branch:
    """One CFG branch of one thread."""

    history: History  # the current expert's residual history
    run: Run = field(default_factory=Run)
    errors: ErrorSteps = field(default_factory=ErrorSteps)  # policy "error"
    auto: AutoChoice = field(default_factory=AutoChoice)  # predictor "auto"
    pending: Optional[Call] = None  # the call between decide and finish
    reset_pending: bool = False  # the pipeline ended the run: the next call starts a new one
    expert: str = ""  # the expert whose history ``history`` is (multi-expert pipelines)
    experts: Dict[str, History] = field(default_factory=dict)  # the other experts' histories

    @property
    def records(self) -> List[StepRecord]:
        """The current run's calls as recorded, their sums not read here (``Runtime.records`` reads them)."""
        return self.run.records

    def new_run(self) -> None:
        self.history.reset()
        self.run, self.errors, self.auto = Run(), ErrorSteps(), AutoChoice()
        self.pending, self.reset_pending = None, False

    def switch_expert(self, expert: str, new: Callable[[], History]) -> None:
        """Make ``expert``'s history the branch's history. Its residuals are not comparable with
        the other expert's, so it starts empty, allocated like the one it replaces (the two
        experts of a pipeline share the hidden-state shape), and the choosers start over; the
        records keep their own sums, so the writes made so far are still read into them."""
        old = self.history
        self.experts[self.expert] = old
        history = self.experts.pop(expert, None)
        if history is None:
            history = new()
        if old.ring is not None:
            history.ensure(old.ring[0])
        history.reset()
        self.history, self.expert = history, expert
        self.run.newest = None
        self.errors, self.auto = ErrorSteps(), AutoChoice()


class Branches:
    """The branches of each thread that makes calls. Two pipelines that share a transformer
    (``Pipeline.from_pipe``) can run in two threads at once, each with its own histories.
    ``current()`` is the calling thread's, or, in a thread that has made no call, those of the
    thread that called last (a summary read elsewhere)."""

    def __init__(self, new: Callable[[], History]):
        self._new = new
        self._threads: "weakref.WeakKeyDictionary[threading.Thread, Dict[str, Branch]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._latest: Dict[str, Branch] = {}

    def current(self) -> Dict[str, Branch]:
        own = self._threads.get(threading.current_thread())
        return own if own is not None else self._latest

    def own(self) -> Dict[str, Branch]:
        """The calling thread's branches (made on its first call)."""
        thread = threading.current_thread()
        own = self._threads.get(thread)
        if own is None:
            with self._lock:
                own = self._threads.setdefault(thread, {})
        self._latest = own
        return own

    def get(self, name: str) -> Branch:
        """The calling thread's branch ``name`` (made on its first call)."""
        branches = self.own()
        b = branches.get(name)
        if b is None:
            b = branches[name] = Branch(self._new())
        return b

    def of_this_thread(self) -> List[Branch]:
        """The calling thread's branches, without making any."""
        return list(self._threads.get(threading.current_thread(), {}).values())

    def every(self) -> List[Branch]:
        """Every branch of every thread that has made calls and still runs."""
        with self._lock:
            states = list(self._threads.values())
        return [b for branches in states for b in branches.values()]
