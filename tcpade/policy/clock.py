"""The step clock: T of the sampling run and the time of the current call, as host numbers.

T comes, first match, from ``set_steps`` (``tcpade.sample`` sets the length of its own run),
the pipeline's scheduler (``total_steps``: the length of its timesteps, found per call) or the
``num_steps`` the user declared (``tcpade.apply(transformer, num_steps=T)``, checked against
the scheduler when both are there). Without any T every call is computed (with one warning):
stages and the final steps cannot be placed, and full computation is always safe.

The time of a call comes from ``clock`` where it knows it (a host copy of the pipeline's
schedule, no device read), else from the call's ``timestep`` tensor (one host read). Every
such read is counted in ``reads`` (the runtime's ``host_reads``).

The warnings about T (unknown, a run shorter or longer than declared, a declared T the
scheduler contradicts) are given once per clock, at the user's line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from typing import Callable, Optional, Tuple

import torch

from .schedules import times_problem

_PACKAGE = __package__.split(".")[0]  # warnings point past every frame of tcpade


def check_steps(name: str, total) -> Optional[int]:
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
        raise ValueError(f"{name} must be an int > 0 or None, got {total!r}")
    return total


def caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside torch,
    diffusers and tcpade (the user's line that called the pipeline or the transformer)."""
    dirs = tuple(os.path.dirname(os.path.abspath(sys.modules[n].__file__)) + os.sep
                 for n in ("torch", "diffusers", _PACKAGE) if n in sys.modules)  # fmt: skip
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


class StepClock:
    def __init__(self, total_steps: Optional[Callable[[], int]] = None, num_steps: Optional[int] = None,
                 clock: Optional[Callable[[], Optional[float]]] = None):  # fmt: skip
        self._scheduler = total_steps  # T of the pipeline's current run, or None
        self._declared = check_steps("num_steps", num_steps)
        self._override: Optional[int] = None
        self.clock = clock  # the current step's time from a host copy, or None: read the timestep
        self.reads = 0  # timestep tensors read, and the copies of finished ``clocked`` blocks
        self._warned: set = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ T
    def set_steps(self, total: Optional[int]) -> None:
        self._override = check_steps("total steps", total)

    @property
    def override(self) -> Optional[int]:
        return self._override

    def total(self) -> Tuple[Optional[int], bool]:
        """(T of the current run or None, whether it is the declared num_steps: the one source of T
        that can be wrong about a run, so its end is checked against it)."""
        if self._override is not None:
            return self._override, False
        real = self._scheduler() if self._scheduler is not None else None
        real = int(real) if real else None
        if real is not None:
            if self._declared is not None and real != self._declared:
                self.warn_once("declared", f"tcpade: num_steps={self._declared} was given, but the pipeline's "
                               f"scheduler runs {real} steps: using {real}")  # fmt: skip
            return real, False
        return self._declared, True

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, stacklevel=caller_stacklevel())

    # --------------------------------------------------------------- time
    def time(self, timestep) -> Optional[float]:
        """The time of this call as a host float: the clock's where it knows it (no device
        read), else the ``timestep`` argument's first element (a tensor: one host read)."""
        if self.clock is not None:
            t = self.clock()
            if t is not None:
                return t
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise ValueError("the transformer was called with an empty timestep tensor")
            self.reads += 1
            return float(timestep.reshape(-1)[0])
        return None if timestep is None else float(timestep)

    def run_times(self, total: int) -> Optional[Tuple[float, ...]]:
        """The time of each of the run's ``total`` steps, where the clock knows them before the
        run ends (``tcpade.sample``'s loop, a pipeline's scheduler: no device read beyond the
        clock's one copy) and they can place the spaced rule (one per step, finite, strictly
        monotonic); else None (the rule then runs on the step index)."""
        get = getattr(self.clock, "run_times", None)
        times = get(total) if get is not None else None
        if times is None:
            return None
        times = tuple(float(x) for x in times)
        return None if times_problem(times, total) else times

    @contextlib.contextmanager
    def clocked(self, clock: Callable[[], Optional[float]]):
        """Inside the block, ``clock`` gives the calls' time; its ``reads``, if it counts any, are
        added to ``reads`` at the end."""
        prev, self.clock = self.clock, clock
        try:
            yield
        finally:
            self.reads += getattr(clock, "reads", 0)
            self.clock = prev

    @property
    def host_reads(self) -> int:
        """Timestep reads, plus the copies of the schedule the current clock made."""
        return self.reads + getattr(self.clock, "reads", 0)
