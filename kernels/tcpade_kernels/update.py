"""Fused update pass: R = h_out - h_in into the history ring, plus the TSI sums.

One memory pass: reads h_in, h_out, R1, R2 (and the probe in the write slot), writes R
(and h_prev <- h_in when a previous-input buffer is kept). Without h_in (``HAS_IN`` off: a
zero input, the output level) R = h_out and nothing stands in for h_in in memory. Each program reduces its block
in fp32 and writes its partial sums (tcpade.core.layout.SUMS); the launcher adds the partials with one torch.sum on
the device (one small launch; fp32 over <= a few thousand partials is exact to ~1e-7
relative), so the result is deterministic (no atomics) and independent of scheduling.
Semantics: tcpade.core.reference.update.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    NSUMS,
    NSUMS_C,
    S_D11,
    S_D12,
    S_D22,
    S_ERR2,
    S_NONFINITE,
    S_R2,
    flat_block,
    interpreting,
    isfinite,
    load_slot,
    needs_int64,
    program_index,
    to_storage,
)


@triton.jit
def _update_kernel(
    h_in_ptr,
    h_out_ptr,
    ring_ptr,
    slots_ptr,
    h_prev_ptr,
    partial_ptr,
    n_elements,
    slot_stride,
    NSLOT: tl.constexpr,
    HAS_IN: tl.constexpr,
    HAS_PREV: tl.constexpr,
    PROBE: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = program_index(IDX64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    s1 = load_slot(slots_ptr, 0, IDX64)
    s2 = load_slot(slots_ptr, 1, IDX64)
    sw = load_slot(slots_ptr, NSLOT - 1, IDX64)
    y = tl.load(h_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r1 = tl.load(ring_ptr + s1 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    r2 = tl.load(ring_ptr + s2 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_IN:
        x_raw = tl.load(h_in_ptr + offs, mask=mask, other=0.0)
        r = y - x_raw.to(tl.float32)
    else:
        x_raw = tl.zeros_like(y)  # a zero input: R = h_out (y - 0 is y), h_prev <- 0
        r = y
    d1 = r1 - r2
    d2 = r - r1
    w_ptrs = ring_ptr + sw * slot_stride + offs
    part = partial_ptr + pid * NSUMS_C
    if PROBE:
        e = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) - r  # read before the write below
        tl.store(part + S_ERR2, tl.sum(e * e, axis=0))
    else:
        tl.store(part + S_ERR2, 0.0)
    stored = to_storage(r, ring_ptr.dtype.element_ty, EXACT_BF16)
    tl.store(w_ptrs, stored, mask=mask)
    if HAS_PREV:
        tl.store(h_prev_ptr + offs, x_raw, mask=mask)
    bad = tl.where(isfinite(stored.to(tl.float32)), 0.0, 1.0)
    tl.store(part + S_D11, tl.sum(d1 * d1, axis=0))
    tl.store(part + S_D22, tl.sum(d2 * d2, axis=0))
    tl.store(part + S_D12, tl.sum(d1 * d2, axis=0))
    tl.store(part + S_R2, tl.sum(r * r, axis=0))
    tl.store(part + S_NONFINITE, tl.sum(bad, axis=0))


# Launch shape per bytes per element: (elements per program, warps), the best of a sweep over
# {2048, 4096, 8192} x {4, 8} warps on a GPU at FLUX.1-dev 1024^2 size (bench/RESULTS.md).
TUNED = {2: (8192, 4), 4: (4096, 8)}


def update(
    h_in: Optional[torch.Tensor],
    h_out: torch.Tensor,
    ring: torch.Tensor,
    slots: torch.Tensor,
    h_prev: Optional[torch.Tensor] = None,
    probe: bool = False,
    block: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Launch the update kernel; inputs are validated by tcpade.core.ops. Returns the fp32 sums.

    ``block`` / ``num_warps`` override the launch shape (benchmarks sweep them). ``h_in=None``:
    a zero input (R = h_out).
    """
    n = h_out.numel()
    tuned_block, tuned_warps = TUNED[2 if h_out.element_size() == 2 else 4]
    block = flat_block(n, block or tuned_block)
    grid = triton.cdiv(n, block)
    partial = torch.empty((grid, NSUMS), dtype=torch.float32, device=h_out.device)
    launch = {} if interpreting() else {"num_warps": num_warps or tuned_warps}
    _update_kernel[(grid,)](
        h_in if h_in is not None else h_out,  # not read without h_in (HAS_IN)
        h_out,
        ring,
        slots,
        h_prev if h_prev is not None else h_out,
        partial,
        n,
        n,
        NSLOT=ring.shape[0],
        HAS_IN=h_in is not None,
        HAS_PREV=h_prev is not None,
        PROBE=bool(probe),
        BLOCK=block,
        EXACT_BF16=interpreting(),
        IDX64=needs_int64(n * ring.shape[0]),
        **launch,
    )
    return partial.sum(0)
