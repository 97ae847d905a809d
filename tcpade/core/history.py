"""The residual history of one cache branch (a preallocated ring), and the sums of its writes.

Like a KV cache: the buffers are allocated once per (shape, dtype, device) and reused
step after step; a change of shape, dtype or device reallocates (and forgets the
history); ``reset()`` forgets without freeing. Per branch it holds

* ``ring``: (S, *h.shape) residuals in the storage dtype, S = ``nslots`` (default 3),
* ``slots``: an int32 device tensor mapping age -> ring slot (slots[0] = R1, newest),
  mirrored on the host (``order``) so no step needs to read it back; a write rotates it
  on the device (a roll by one), so no step copies host data to the device for it,
* ``times``: the schedule time of each stored residual (host floats),
* ``h_prev``: the previous call's h_in, only when ``keep_prev_input`` (the paper's
  input-change correction needs it) and the input is not zero.

Output level (the transformer's output extrapolated; it is its own residual): ``record`` and
``predict`` take ``h_in=None``, a zero input. The history is then ``output``: the ops read
no input (R = h_out, h_out = R_eff), and no ``h_prev`` is kept (the previous input is zero
too, so the input-change correction is zero: its coefficient is 0, ``has_prev`` False).

Memory: (S + keep_prev_input) hidden-state-sized tensors (S at output level), reported by
``nbytes``.

Device work and host bookkeeping are separate calls: ``record`` / ``predict`` run the
fused ops on tensors only (``predict`` is traced inside compiled block regions), and
``advance`` moves the host mirror (and rolls ``slots``) after a write; nothing here waits
for the device. Each write's sums come back as a device tensor; ``Sums`` carries them to
the host, read by name (``tcpade.core.layout.SUMS``), only when something asks for them.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from . import coef as K
from . import ops
from .layout import SUMS

SumValues = namedtuple("SumValues", SUMS)
"""The host values of one write's sums, by name (``v.d11``, ``v.nonfinite``, ...)."""


class Sums:
    """The device sums of one history write, on their way to the host.

    Made right after the write: on CUDA a non-blocking copy into pinned memory and an
    event are queued behind it, so ``get`` later waits for that event only, not for the
    work queued after it. ``reduce`` (the one hook for the ranks of a sharded sequence,
    see ``tcpade.distributed``) turns the local sums into the sums of the whole sequence
    first, on the device.
    """

    __slots__ = ("_host", "_event", "_values", "extra")

    def __init__(self, sums: torch.Tensor, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 extra: Optional[torch.Tensor] = None):  # fmt: skip
        if reduce is not None:
            sums = reduce(sums)
        if extra is not None:  # device values that travel with the sums (e.g. the "auto" choice)
            sums = torch.cat([sums, extra.to(sums.dtype)])
        self._values: Optional[SumValues] = None
        self.extra: tuple = ()
        self._event = None
        if sums.device.type == "cuda":
            self._host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            self._host.copy_(sums, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = sums

    def ready(self) -> bool:
        """Can ``get`` return without waiting for the device?"""
        return self._values is not None or self._event is None or self._event.query()

    @property
    def read(self) -> bool:
        """Has ``get`` already brought the values to the host?"""
        return self._values is not None

    def get(self) -> SumValues:
        """The host values (waits for the copy the first time)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            values = [float(v) for v in self._host.tolist()]
            self._values, self.extra = SumValues(*values[: len(SUMS)]), tuple(values[len(SUMS) :])
        return self._values


def coef_to_device(values, device) -> torch.Tensor:
    """A float32 device tensor of ``values`` without synchronising the stream (pinned host
    memory and a non-blocking copy on CUDA; PyTorch's caching host allocator keeps the
    pinned block until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return K.coef_tensor(values, device)
    return K.coef_tensor(values, "cpu").pin_memory().to(device, non_blocking=True)


@dataclass
class History:
    nslots: int = 3
    keep_prev_input: bool = False
    ring: Optional[torch.Tensor] = field(default=None, repr=False)
    slots: Optional[torch.Tensor] = field(default=None, repr=False)
    h_prev: Optional[torch.Tensor] = field(default=None, repr=False)
    output: bool = False  # the inputs are zero (output level): no h_prev
    order: List[int] = field(default_factory=list)
    times: List[float] = field(default_factory=list)
    count: int = 0
    has_prev: bool = False
    # The state (ring, slots, h_prev) that passed the ops' checks in a call of its own: later eager
    # calls on it skip them (``_vals``). Reset by any new tensor in one of those fields.
    _checked: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)
    # slots' values rolled k times (allocated with the ring): advance copies one, on the device.
    _rolls: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.nslots, int) or self.nslots < 3:
            raise ValueError(f"nslots must be an int >= 3, got {self.nslots!r}")

    # ---------------------------------------------------------------- allocation
    def matches(self, h: torch.Tensor) -> bool:
        r = self.ring
        return r is not None and r.shape[1:] == h.shape and r.dtype == h.dtype and r.device == h.device

    def ensure(self, h: torch.Tensor, output: Optional[bool] = None) -> bool:
        """Allocate for h's (shape, dtype, device) if needed; True if (re)allocated. ``output``:
        the inputs will be zero (no h_prev); None keeps what the history is. A change of
        either reallocates and forgets the history."""
        output = self.output if output is None else bool(output)
        if self.matches(h) and output == self.output:
            return False
        self.output = output
        self.ring = torch.zeros((self.nslots, *h.shape), dtype=h.dtype, device=h.device)
        keep = self.keep_prev_input and not output
        self.h_prev = torch.zeros_like(h, memory_format=torch.contiguous_format) if keep else None
        self.slots = torch.arange(self.nslots, dtype=torch.int32, device=h.device)
        # Every value slots takes, by its first element j: arange rolled k times is (arange + j) mod S.
        self._rolls = (self.slots, [(self.slots + j) % self.nslots for j in range(self.nslots)])
        self.reset()
        return True

    def reset(self) -> None:
        """Forget the history, keep the buffers."""
        self.order = list(range(self.nslots))
        self.times = [math.nan] * self.nslots
        self.count = 0
        self.has_prev = False
        if self.slots is not None:
            # Only at allocation and reset: the identity order, made on the device.
            self.slots.copy_(torch.arange(self.nslots, dtype=self.slots.dtype, device=self.slots.device))

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.ring, self.h_prev, self.slots):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # --------------------------------------------------------------- bookkeeping
    def advance(self, t: float, wrote: bool) -> None:
        """Host bookkeeping after a call that ran ``record`` or ``predict``: with ``wrote``
        (a residual was stored at time t) the write slot becomes R1 and everything else ages
        by one, with the same roll of ``slots`` on the device."""
        self.has_prev = self.h_prev is not None
        if not wrote:
            return
        order = self.order
        self.order = order = order[-1:] + order[:-1]
        self.times = [float(t)] + self.times[:-1]
        if self.count < self.nslots:
            self.count += 1
        rolls = self._rolls
        if rolls is not None and rolls[0] is self.slots:
            self.slots.copy_(rolls[1][order[0]])  # one copy on the device, nothing allocated
        else:  # slots that ensure did not allocate
            self.slots.copy_(self.slots.roll(1))

    def recent_times(self) -> List[float]:
        """Times of R1, R2, R3 (newest first); NaN where nothing is stored."""
        return self.times[:3]

    def coef_values(self, variant: str, stage: str, t_target: float, **kw) -> list:
        """The coefficients (host floats) of a prediction at ``t_target`` (``tcpade.core.coef.build_coef``)."""
        if not self.has_prev:
            kw["gamma"] = 0.0  # no previous input stored: no input-change correction
        return K.build_coef(variant, stage, self.recent_times(), t_target, self.count, self.nslots, **kw)

    def coef(self, variant: str, stage: str, t_target: float, **kw) -> torch.Tensor:
        """The coefficient tensor (on the ring's device) of a prediction at ``t_target``."""
        return coef_to_device(self.coef_values(variant, stage, t_target, **kw), self.ring.device)

    # --------------------------------------------------------------------- steps
    def _vals(self) -> Optional[list]:
        """``order`` (the host values of ``slots``) when the state has passed the ops' checks and is
        unchanged since (``ops.update_direct`` and ``ops.predict_direct`` then skip them), else None."""
        c = self._checked
        if c is not None and c[0] is self.ring and c[1] is self.slots and c[2] is self.h_prev:
            return self.order
        return None

    def _passed(self) -> None:
        """The state passed the ops' checks in a call that checked it whole. Later eager calls skip
        them while it is the same state, and use ``order`` for the values of ``slots``, which it
        mirrors where ``ensure`` allocated slots (only these methods write either; slots from
        elsewhere are read and checked by the op every call)."""
        rolls = self._rolls
        if rolls is not None and rolls[0] is self.slots:
            self._checked = (self.ring, self.slots, self.h_prev)

    def record(self, h_in: Optional[torch.Tensor], h_out: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """A computed step: write R = h_out - h_in into the write slot; return the sums (device).
        ``advance(t, wrote=True)`` makes it R1. ``h_in=None``: a zero input (output level), R = h_out."""
        if h_in is None:
            self.ensure(h_out, output=True)
        else:
            self.ensure(h_in, output=False)
        ring, slots, h_prev = self.ring, self.slots, self.h_prev
        if not ops.direct(h_in, h_out, ring, slots, h_prev):  # traced, or not a plain eager call
            return ops.update(h_in, h_out, ring, slots, h_prev, bool(probe))
        vals = self._vals()
        sums = ops.update_direct(h_in, h_out, ring, slots, h_prev, bool(probe), vals)
        if vals is None:
            self._passed()
        return sums

    def predict(self, h_in: Optional[torch.Tensor], coef: torch.Tensor, variant: str, store: bool = False,
                write_out: bool = True, probe: bool = False):  # fmt: skip
        """A skipped step (or, with ``probe``, a prediction of a step about to be computed).

        coef: the tensor from ``coef``. store: write R_eff into the write slot (the paper's
        rule; ``advance(t, wrote=True)`` makes it R1). probe: write R_eff into the write
        slot for the update pass to measure against, without advancing.
        Returns (h_out or empty, sums on the device). Device work only, traceable: the
        caller checks ``count >= coef.MIN_HISTORY[variant]`` (the host count is not read here,
        so a compiled region does not specialise on it). ``h_in=None``: a zero input (output
        level), h_out = R_eff in a ring slot's shape.
        """
        if h_in is None:
            if self.ring is None:
                raise RuntimeError("predict(None) before any record()")
        elif not self.matches(h_in):
            raise RuntimeError("predict() before any record() for this shape/dtype/device")
        ring, slots, h_prev = self.ring, self.slots, self.h_prev
        vals = None
        if ops.direct(h_in, ring, slots, coef, h_prev):  # eager: no custom-op dispatch, checks once per state
            vals = self._vals()
            out, sums = ops.predict_direct(h_in, ring, slots, coef, h_prev, variant, bool(store or probe),
                                           bool(write_out), vals)  # fmt: skip
            if vals is None:
                self._passed()
        else:  # traced (the graph needs the custom op), or not a plain eager call
            out, sums = ops.predict(h_in, ring, slots, coef, h_prev, variant, bool(store or probe),
                                    bool(write_out))  # fmt: skip
        # The op replaced each non-finite element of h_out by h_in + R1 (R1 where finite, else
        # 0) and counted it in the sums' ``nonfinite``. A stored prediction (the paper's rule)
        # keeps its finite elements; its non-finite ones become that R1 in the slot, so a NaN
        # never enters the history through a prediction.
        if store and not probe and vals is not None:  # eager, order checked: the slots by host index
            r1 = torch.nan_to_num(ring[vals[0]], nan=0.0, posinf=0.0, neginf=0.0)
            stored = ring[vals[-1]]
            torch.where(torch.isfinite(stored), stored, r1, out=stored)
        elif store and not probe:
            r1 = self.ring.index_select(0, self.slots[:1]).squeeze(0)
            r1 = torch.where(torch.isfinite(r1), r1, torch.zeros_like(r1))
            w = self.slots[-1:].long()
            stored = self.ring.index_select(0, w).squeeze(0)
            self.ring.index_copy_(0, w, torch.where(torch.isfinite(stored), stored, r1).unsqueeze(0))
        return out, sums
