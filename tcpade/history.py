"""The residual history of one cache branch: a preallocated ring, updated in place.

Like a KV cache: the buffers are allocated once per (shape, dtype, device) and reused
step after step; a change of shape, dtype or device reallocates (and forgets the
history); ``reset()`` forgets without freeing. Per branch it holds

* ``ring``: (S, *h.shape) residuals in the storage dtype, S = ``nslots`` (default 3),
* ``slots``: an int32 device tensor mapping age -> ring slot (slots[0] = R1, newest),
  mirrored on the host (``order``) so no step needs to read it back; a write rotates it
  on the device (a roll by one), so no step copies host data to the device for it,
* ``times``: the schedule time of each stored residual (host floats),
* ``h_prev``: the previous call's h_in, only when ``keep_prev_input`` (the paper's
  input-change correction needs it).

Memory: (S + keep_prev_input) hidden-state-sized tensors, reported by ``nbytes``.

Nothing here waits for the device: the per-step scalars (``coef``) go up through pinned
memory with a non-blocking copy (``torch.tensor(values, device="cuda")`` would copy from
pageable memory and synchronise the stream), and the sums come back as device tensors
for the Runtime to read when, and only when, a decision needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import coef as K
from . import ops


def upload(values, device) -> torch.Tensor:
    """A float32 device tensor of ``values`` without synchronising the stream.

    On CUDA the host copy is pinned and copied with ``non_blocking=True``; PyTorch's
    caching host allocator keeps the pinned block until that copy has run, so it is
    never overwritten early. Elsewhere it is a plain tensor.
    """
    host = torch.tensor(list(values), dtype=torch.float32)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class History:
    nslots: int = 3
    keep_prev_input: bool = False
    ring: Optional[torch.Tensor] = field(default=None, repr=False)
    slots: Optional[torch.Tensor] = field(default=None, repr=False)
    h_prev: Optional[torch.Tensor] = field(default=None, repr=False)
    order: List[int] = field(default_factory=list)
    times: List[float] = field(default_factory=list)
    count: int = 0
    has_prev: bool = False
    last_sums: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.nslots, int) or self.nslots < 3:
            raise ValueError(f"nslots must be an int >= 3, got {self.nslots!r}")

    # ---------------------------------------------------------------- allocation
    def matches(self, h: torch.Tensor) -> bool:
        r = self.ring
        return r is not None and r.shape[1:] == h.shape and r.dtype == h.dtype and r.device == h.device

    def ensure(self, h: torch.Tensor) -> bool:
        """Allocate for h's (shape, dtype, device) if needed; True if (re)allocated."""
        if self.matches(h):
            return False
        self.ring = torch.zeros((self.nslots, *h.shape), dtype=h.dtype, device=h.device)
        self.h_prev = torch.zeros_like(h, memory_format=torch.contiguous_format) if self.keep_prev_input else None
        self.slots = torch.arange(self.nslots, dtype=torch.int32, device=h.device)
        self.reset()
        return True

    def reset(self) -> None:
        """Forget the history, keep the buffers."""
        self.order = list(range(self.nslots))
        self.times = [math.nan] * self.nslots
        self.count = 0
        self.has_prev = False
        self.last_sums = None
        if self.slots is not None:
            self._push_order()

    def release(self) -> None:
        self.ring = self.slots = self.h_prev = None
        self.order, self.times, self.count, self.has_prev = [], [], 0, False

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.ring, self.h_prev, self.slots):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # --------------------------------------------------------------- bookkeeping
    def _push_order(self) -> None:
        # Only at allocation and reset: the identity order, made on the device.
        self.slots.copy_(torch.arange(self.nslots, dtype=self.slots.dtype, device=self.slots.device))

    def _rotate(self, t: float) -> None:
        w = self.order[-1]
        self.order = [w] + self.order[:-1]
        self.times = [float(t)] + self.times[:-1]
        self.count = min(self.count + 1, self.nslots)
        # The write slot becomes R1, everything else ages by one: the same roll on the device.
        self.slots.copy_(self.slots.roll(1))

    def recent_times(self) -> List[float]:
        """Times of R1, R2, R3 (newest first); NaN where nothing is stored."""
        return self.times[:3]

    # --------------------------------------------------------------------- steps
    def record(self, h_in: torch.Tensor, h_out: torch.Tensor, t: float, probe: bool = False) -> torch.Tensor:
        """A computed step: store R = h_out - h_in at time t; return the sums (device)."""
        self.ensure(h_in)
        sums = ops.update(h_in, h_out, self.ring, self.slots, self.h_prev, bool(probe))
        self._rotate(t)
        self.has_prev = self.h_prev is not None
        self.last_sums = sums
        return sums

    def coef(self, variant: str, stage: str, t_target: float, **kw) -> list:
        if not self.has_prev:
            kw["gamma"] = 0.0  # no previous input stored: no input-change correction
        return K.build_coef(variant, stage, self.recent_times(), t_target, self.count, self.nslots, **kw)

    def predict(
        self,
        h_in: torch.Tensor,
        coef_values: list,
        variant: str,
        t_target: float,
        store: bool = False,
        write_out: bool = True,
        probe: bool = False,
    ):
        """A skipped step (or, with ``probe``, a prediction of a step about to be computed).

        store: append R_eff to the history (the paper's rule). probe: write R_eff into the
        write slot without advancing, for the update pass to measure against.
        Returns (h_out or empty, sums on the device).
        """
        if not self.matches(h_in):
            raise RuntimeError("predict() before any record() for this shape/dtype/device")
        if self.count < K.MIN_HISTORY[variant]:
            raise RuntimeError(
                f"variant {variant!r} needs {K.MIN_HISTORY[variant]} stored residuals, have {self.count}"
            )
        coef = upload(coef_values, h_in.device)
        out, sums = ops.predict(
            h_in, self.ring, self.slots, coef, self.h_prev, variant, bool(store or probe), bool(write_out)
        )
        self.has_prev = self.h_prev is not None
        if store and not probe:
            self._rotate(t_target)
            self.last_sums = sums
        return out, sums
