"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from tcpade.core import layout as L

# The sums every history write returns (tcpade.core.layout.SUMS): their count, each one's
# position, and the power-of-two width of the in-register vector they are gathered in.
# Globals read inside @triton.jit must be tl.constexpr.
NSUMS = L.NSUMS
SUMS_PAD = tl.constexpr(triton.next_power_of_2(L.NSUMS))
NSUMS_C = tl.constexpr(L.NSUMS)
S_D11, S_D22, S_D12, S_ERR2, S_R2, S_NONFINITE = (
    tl.constexpr(L.SUMS.index(n)) for n in ("d11", "d22", "d12", "err2", "r2", "nonfinite")
)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where each program instance is slow (numpy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def flat_block(n: int, block: int) -> int:
    """Elements per program: ``block`` on a GPU; under the interpreter up to 64K, so the
    small tensors of the tests need one program (each program is slow there)."""
    if interpreting():
        return max(16, min(triton.next_power_of_2(n), 1 << 16))
    return block


def needs_int64(n_addressed: int) -> bool:
    """Whether element offsets (up to ``n_addressed``, ring slots included) can pass 2^31.

    32-bit offsets save address arithmetic in these instruction-heavy kernels; the
    switch is a constexpr, so each width is its own compiled specialisation.
    """
    return n_addressed >= 2**31 - 1


@triton.jit
def program_index(IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def load_slot(slots_ptr, i: tl.constexpr, IDX64: tl.constexpr):
    """Ring slot holding the residual of age ``i`` (0 = newest), read on the device."""
    s = tl.load(slots_ptr + i)
    if IDX64:
        s = s.to(tl.int64)
    return s


@triton.jit
def isfinite(x):
    # NaN fails every comparison, so this is False for NaN and +-Inf.
    return tl.abs(x) < float("inf")


@triton.jit
def to_storage(x, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype, round-to-nearest-even.

    GPUs round fp32 -> bf16 to nearest even natively. Triton's CPU interpreter truncates
    instead (triton 3.9), which would make every bf16 test disagree with torch by one
    ulp on half the elements; under the interpreter (EXACT_BF16) the rounding is done
    on the bits: add 0x7FFF plus the lowest kept bit, keep NaN as a quiet NaN.
    """
    if EXACT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
