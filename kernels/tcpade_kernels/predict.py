"""Fused predict pass: h_out = h_in + R_hat for a skipped step (docs/method.md sections 2, 4, 5).

One memory pass: reads h_in (and h_prev), the residuals the variant needs, writes h_out
(without h_in, ``HAS_IN`` off: a zero input, the output level, h_out = 0 + R_eff, nothing
read for it)
and optionally R_eff into the history ring with its TSI sums (the paper's history rule,
or a probe prediction for the error policy). The per-step scalars come in as a tensor
(tcpade.core.coef), so a new step is new tensor values, not a new compilation.

Two kernels share one epilogue:
* ``_predict_ew_kernel``: elementwise variants (paper, reuse, linear) over a flat range.
* ``_predict_rational_kernel``: the time-aware [1/1] Pade, one program per block of token
  rows. A row that fits one tile is fitted and predicted from the same loads; a wider
  row is walked twice: pass 1 reduces the shared-denominator fit, pass 2 re-reads the row
  (from cache) and writes. A row is owned by one program, so the fit of a row is complete
  before any element of it is written (the write slot may be R3's own slot).
Semantics: tcpade.core.reference.predict.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tcpade.core import coef as K
from tcpade.core import layout as L

from ._common import (
    NSUMS,
    NSUMS_C,
    S_D11,
    S_D12,
    S_D22,
    S_NONFINITE,
    S_R2,
    SUMS_PAD,
    flat_block,
    interpreting,
    isfinite,
    load_slot,
    needs_int64,
    program_index,
    to_storage,
)

# Everything below comes from tcpade.core.layout / tcpade.core.coef: the coefficient indices, the
# variant codes, the paper's constants. Globals read inside @triton.jit must be
# tl.constexpr (the interpreter does not check; tests/aot_compile.py does).
_c = tl.constexpr
W_MAIN, C1, C2, GAMMA = _c(K.W_MAIN), _c(K.C1), _c(K.C2), _c(K.GAMMA)
LAM1, LAM2 = _c(K.LAM1), _c(K.LAM2)
ALP0, ALP1, ALP2 = _c(K.ALP0), _c(K.ALP1), _c(K.ALP2)
TAU0, TAU1, TAU2 = _c(K.TAU0), _c(K.TAU1), _c(K.TAU2)
BMAX, KAPPA, WAVG = _c(K.BMAX), _c(K.KAPPA), _c(K.WAVG)
PAPER, RATIONAL, REUSE, LINEAR = (_c(L.VARIANT_TABLE[n].code) for n in ("paper", "rational", "reuse", "linear"))
_P = L.PAPER
P_S_RATE, P_S_EPS, P_NUM_R1 = _c(_P.s_rate), _c(_P.s_eps), _c(_P.num_r1)
P_DEN_A, P_DEN_MIN = _c(_P.den_a), _c(_P.den_min)
P_AVG_R1, P_AVG_R2, P_TRUST_D, P_TRUST_MAG = _c(_P.avg_r1), _c(_P.avg_r2), _c(_P.trust_d), _c(_P.trust_mag)
P_BETA_S, P_BETA_0, P_FB1 = _c(_P.beta_s), _c(_P.beta_0), _c(_P.fb1)


@triton.jit
def _paper_main(r1, r2, ring_ptr, s3, s4, offs, slot_stride, mask, coef_ptr, NSLOT: tl.constexpr):
    """tcpade.core.reference.paper_pade and the two fallbacks of _paper_main, elementwise."""
    # (Tensor first in each product with a table constant: the interpreter cannot multiply
    # a constexpr by a tensor. IEEE products commute, so the bits are those of the reference.)
    d = tl.abs(r1 - r2)
    mag = 0.5 * (tl.abs(r1) + tl.abs(r2))
    s = tl.exp(d * (-P_S_RATE) / (mag + P_S_EPS))
    num = s * P_NUM_R1 * r1 - s * r2
    den = 1.0 - s * P_DEN_A
    den = tl.where(den >= 0.0, tl.maximum(den, P_DEN_MIN), tl.minimum(den, -P_DEN_MIN))
    p = num / den
    avg = r1 * P_AVG_R1 + r2 * P_AVG_R2
    m = tl.maximum(d * P_TRUST_D, mag * P_TRUST_MAG)
    p = avg + tl.maximum(tl.minimum(p - avg, m), -m)
    beta = s * P_BETA_S + P_BETA_0
    pade = beta * p + (1.0 - beta) * avg
    fb1 = r1 + (r1 - r2) * P_FB1
    # R3/R4 are fetched only where both the Pade value and the first fallback failed, as
    # masked elementwise loads (a block-level `if any(need)` branch around them was slower
    # on a GPU, see bench/RESULTS.md).
    need = mask & (~isfinite(pade)) & (~isfinite(fb1))
    r3 = tl.load(ring_ptr + s3 * slot_stride + offs, mask=need, other=0.0).to(tl.float32)
    wavg = tl.load(coef_ptr + WAVG) * r1 + tl.load(coef_ptr + WAVG + 1) * r2
    wavg += tl.load(coef_ptr + WAVG + 2) * r3
    if NSLOT >= 4:
        r4 = tl.load(ring_ptr + s4 * slot_stride + offs, mask=need, other=0.0).to(tl.float32)
        wavg += tl.load(coef_ptr + WAVG + 3) * r4
    fb = tl.where(isfinite(fb1), fb1, wavg)
    return tl.where(isfinite(pade), pade, fb)


@triton.jit
def _epilogue(
    rhat,
    r1,
    r2,
    x_raw,  # h_in as stored, or an fp32 zero block (a zero input)
    offs,
    mask,
    w_ptrs,
    h_prev_ptr,
    out_ptr,
    coef_ptr,
    acc,
    HAS_PREV: tl.constexpr,
    STORE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    """Input-change correction, stores, and this tile's partial sums added to ``acc``.

    A non-finite element of h_out is written as h_in + R1 instead, R1 where finite and 0
    where not (tcpade.core.ops.predict);
    the nonfinite sum counts the raw predictions that were not finite."""
    x = x_raw.to(tl.float32)
    if HAS_PREV:
        prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(coef_ptr + GAMMA)
        # Skip the term entirely at gamma == 0 so a non-finite h_prev cannot leak in.
        rhat = rhat + tl.where(gamma != 0.0, gamma * (x - prev), 0.0)
        tl.store(h_prev_ptr + offs, x_raw, mask=mask)
    stored = to_storage(rhat, w_ptrs.dtype.element_ty, EXACT_BF16)
    bad = ~isfinite(stored.to(tl.float32))
    if STORE:
        tl.store(w_ptrs, stored, mask=mask)
    if WRITE_OUT:
        o = to_storage(x + rhat, out_ptr.dtype.element_ty, EXACT_BF16)
        bad_o = ~isfinite(o.to(tl.float32))
        bad = bad | bad_o
        r1_ok = tl.where(isfinite(r1), r1, 0.0)  # a non-finite R1 contributes nothing
        o = tl.where(bad_o, to_storage(x + r1_ok, out_ptr.dtype.element_ty, EXACT_BF16), o)
        tl.store(out_ptr + offs, o, mask=mask)
    bad = bad & mask
    idx = tl.arange(0, SUMS_PAD)
    vals = tl.zeros([SUMS_PAD], dtype=tl.float32)
    if STORE:
        d1 = r1 - r2
        d2 = rhat - r1
        vals = tl.where(idx == S_D11, tl.sum(tl.ravel(d1 * d1), axis=0), vals)
        vals = tl.where(idx == S_D22, tl.sum(tl.ravel(d2 * d2), axis=0), vals)
        vals = tl.where(idx == S_D12, tl.sum(tl.ravel(d1 * d2), axis=0), vals)
    vals = tl.where(idx == S_R2, tl.sum(tl.ravel(rhat * rhat), axis=0), vals)
    vals = tl.where(idx == S_NONFINITE, tl.sum(tl.ravel(bad.to(tl.float32)), axis=0), vals)
    return acc + vals


@triton.jit
def _predict_ew_kernel(
    h_in_ptr,
    ring_ptr,
    slots_ptr,
    coef_ptr,
    h_prev_ptr,
    out_ptr,
    partial_ptr,
    n_elements,
    slot_stride,
    NSLOT: tl.constexpr,
    VARIANT: tl.constexpr,
    HAS_IN: tl.constexpr,
    HAS_PREV: tl.constexpr,
    STORE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = program_index(IDX64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    s1 = load_slot(slots_ptr, 0, IDX64)
    s2 = load_slot(slots_ptr, 1, IDX64)
    s3 = load_slot(slots_ptr, 2, IDX64)
    if NSLOT >= 4:
        s4 = load_slot(slots_ptr, 3, IDX64)
    else:
        s4 = s3
    sw = load_slot(slots_ptr, NSLOT - 1, IDX64)
    r1 = tl.load(ring_ptr + s1 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_IN:
        x_raw = tl.load(h_in_ptr + offs, mask=mask, other=0.0)
    else:
        x_raw = tl.zeros_like(r1)  # a zero input: 0 + R_eff, 0 - h_prev, as with a zero tensor
    if VARIANT == REUSE and not STORE:
        # Reuse needs R2 only for the TSI sums of a stored prediction.
        r2 = r1
    else:
        if VARIANT == LINEAR:
            s2 = _r2_slot(s1, s2, coef_ptr)
        r2 = tl.load(ring_ptr + s2 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if VARIANT == REUSE:
        rhat = r1
    else:
        if VARIANT == PAPER:
            main = _paper_main(r1, r2, ring_ptr, s3, s4, offs, slot_stride, mask, coef_ptr, NSLOT)
        else:
            main = tl.load(coef_ptr + LAM1) * r2 + tl.load(coef_ptr + LAM2) * r1
        w = tl.load(coef_ptr + W_MAIN)
        rhat = tl.load(coef_ptr + C1) * r1 + tl.load(coef_ptr + C2) * r2
        rhat += tl.where(w != 0.0, w * main, 0.0)
    acc = _epilogue(
        rhat,
        r1,
        r2,
        x_raw,
        offs,
        mask,
        ring_ptr + sw * slot_stride + offs,
        h_prev_ptr,
        out_ptr,
        coef_ptr,
        tl.zeros([SUMS_PAD], dtype=tl.float32),
        HAS_PREV,
        STORE,
        WRITE_OUT,
        EXACT_BF16,
    )
    idx = tl.arange(0, SUMS_PAD)
    tl.store(partial_ptr + pid * NSUMS_C + idx, acc, mask=idx < NSUMS_C)


@triton.jit
def _r2_slot(s1, s2, coef_ptr):
    """R2's slot, or R1's where no weight falls on R2 (rational / linear with one residual stored):
    R2 is then not read, so a stale non-finite value in its slot cannot leak in through 0 * NaN
    (the reference's r2_unread; its terms read R1 with zero weight)."""
    w = (tl.abs(tl.load(coef_ptr + LAM1)) + tl.abs(tl.load(coef_ptr + ALP0)) + tl.abs(tl.load(coef_ptr + ALP1))
         + tl.abs(tl.load(coef_ptr + C2)))  # fmt: skip
    return tl.where(w == 0.0, s1, s2)


@triton.jit
def _rational_stats(y0, y1, y2, a0, a1, a2, t0, t1, t2, l1, l2):
    """Per-row sums of one tile: S*T, T*T, Lty^2 and (R1 - R2)^2 (docs/method.md section 5)."""
    S = a0 * y0 + a1 * y1 + a2 * y2
    T = a0 * t0 * y0 + a1 * t1 * y1 + a2 * t2 * y2
    lty = l1 * t1 * y1 + l2 * t2 * y2
    d = y2 - y1
    return tl.sum(S * T, axis=1), tl.sum(T * T, axis=1), tl.sum(lty * lty, axis=1), tl.sum(d * d, axis=1)


@triton.jit
def _rational_b1(st, tt, ll, dd, coef_ptr):
    """Shared row denominator b1 = -sum(S*T) / sum(T*T), pole guard, kappa bound."""
    b1 = -st / (tt + 1e-30)
    bmax = tl.load(coef_ptr + BMAX)
    # NaN must survive the guard (a non-finite residual in the fit must show in the
    # output): Triton's min/max return the non-NaN operand unless told otherwise.
    nan_all: tl.constexpr = tl.PropagateNan.ALL
    b1 = tl.maximum(tl.minimum(b1, bmax, propagate_nan=nan_all), -bmax, propagate_nan=nan_all)
    kappa = tl.load(coef_ptr + KAPPA)
    lim = kappa * tl.sqrt(dd)
    dev = tl.abs(b1) * tl.sqrt(ll)
    over = (dev > lim) & (lim * 0.0 + kappa > 0.0)
    return tl.where(over, b1 * (lim / tl.where(over, dev, 1.0)), b1)


@triton.jit
def _rational_rhat(y1, y2, b1, l1, l2, t1, t2, coef_ptr):
    main = l1 * y1 + l2 * y2 + b1[:, None] * (l1 * t1 * y1 + l2 * t2 * y2)
    w = tl.load(coef_ptr + W_MAIN)
    rhat = tl.load(coef_ptr + C1) * y2 + tl.load(coef_ptr + C2) * y1
    return rhat + tl.where(w != 0.0, w * main, 0.0)


@triton.jit
def _rational_load(ring_ptr, s1, s2, s3, slot_stride, offs, mask, a0):
    """(R3, R2, R1) of one tile in fp32. R3 is read only with a non-zero weight a0 (three
    residuals stored, a regular grid), so a stale non-finite value in its slot cannot leak
    in through 0 * NaN. (Mask spelled tl.where(mask, a0, 0) != 0: the interpreter cannot
    `&` a scalar with a block.)"""
    y2 = tl.load(ring_ptr + s1 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = tl.load(ring_ptr + s2 * slot_stride + offs, mask=mask, other=0.0).to(tl.float32)
    y0 = tl.load(ring_ptr + s3 * slot_stride + offs, mask=tl.where(mask, a0, 0.0) != 0.0, other=0.0)
    return y0.to(tl.float32), y1, y2


@triton.jit
def _rational_write(
    y1, y2, b1, l1, l2, t1, t2, h_in_ptr, offs, mask, w_ptrs, h_prev_ptr, out_ptr, coef_ptr, acc,
    HAS_IN: tl.constexpr, HAS_PREV: tl.constexpr, STORE: tl.constexpr, WRITE_OUT: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):  # fmt: skip
    rhat = _rational_rhat(y1, y2, b1, l1, l2, t1, t2, coef_ptr)
    if HAS_IN:
        x_raw = tl.load(h_in_ptr + offs, mask=mask, other=0.0)
    else:
        x_raw = tl.zeros_like(y2)  # a zero input
    return _epilogue(
        rhat, y2, y1, x_raw, offs, mask, w_ptrs, h_prev_ptr, out_ptr, coef_ptr, acc,
        HAS_PREV, STORE, WRITE_OUT, EXACT_BF16,
    )  # fmt: skip


@triton.jit
def _predict_rational_kernel(
    h_in_ptr,
    ring_ptr,
    slots_ptr,
    coef_ptr,
    h_prev_ptr,
    out_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    slot_stride,
    NSLOT: tl.constexpr,
    HAS_IN: tl.constexpr,
    HAS_PREV: tl.constexpr,
    STORE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_PASS: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = program_index(IDX64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    s1 = load_slot(slots_ptr, 0, IDX64)
    s2 = _r2_slot(s1, load_slot(slots_ptr, 1, IDX64), coef_ptr)
    s3 = load_slot(slots_ptr, 2, IDX64)
    sw = load_slot(slots_ptr, NSLOT - 1, IDX64)
    a0 = tl.load(coef_ptr + ALP0)
    a1 = tl.load(coef_ptr + ALP1)
    a2 = tl.load(coef_ptr + ALP2)
    t0 = tl.load(coef_ptr + TAU0)
    t1 = tl.load(coef_ptr + TAU1)
    t2 = tl.load(coef_ptr + TAU2)
    l1 = tl.load(coef_ptr + LAM1)
    l2 = tl.load(coef_ptr + LAM2)
    acc = tl.zeros([SUMS_PAD], dtype=tl.float32)
    if ONE_PASS:
        # The whole row fits one tile: the fit and the prediction share the loaded residuals.
        mask = rmask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        y0, y1, y2 = _rational_load(ring_ptr, s1, s2, s3, slot_stride, offs, mask, a0)
        st, tt, ll, dd = _rational_stats(y0, y1, y2, a0, a1, a2, t0, t1, t2, l1, l2)
        b1 = _rational_b1(st, tt, ll, dd, coef_ptr)
        acc = _rational_write(
            y1, y2, b1, l1, l2, t1, t2, h_in_ptr, offs, mask, ring_ptr + sw * slot_stride + offs, h_prev_ptr,
            out_ptr, coef_ptr, acc, HAS_IN, HAS_PREV, STORE, WRITE_OUT, EXACT_BF16,
        )  # fmt: skip
    else:
        st = tl.zeros([BLOCK_R], dtype=tl.float32)
        tt = tl.zeros([BLOCK_R], dtype=tl.float32)
        ll = tl.zeros([BLOCK_R], dtype=tl.float32)
        dd = tl.zeros([BLOCK_R], dtype=tl.float32)
        # Pass 1 over the row: the least-squares fit of the shared denominator.
        for c0 in range(0, n_cols, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc < n_cols)[None, :]
            offs = rows[:, None] * n_cols + cc[None, :]
            y0, y1, y2 = _rational_load(ring_ptr, s1, s2, s3, slot_stride, offs, mask, a0)
            a, b, c, d = _rational_stats(y0, y1, y2, a0, a1, a2, t0, t1, t2, l1, l2)
            st += a
            tt += b
            ll += c
            dd += d
        b1 = _rational_b1(st, tt, ll, dd, coef_ptr)
        # Pass 2: predict and write (the row was just read: this re-read hits the cache;
        # R3, unused here, is masked off).
        for c0 in range(0, n_cols, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc < n_cols)[None, :]
            offs = rows[:, None] * n_cols + cc[None, :]
            _, y1, y2 = _rational_load(ring_ptr, s1, s2, s3, slot_stride, offs, mask, 0.0)
            acc = _rational_write(
                y1, y2, b1, l1, l2, t1, t2, h_in_ptr, offs, mask, ring_ptr + sw * slot_stride + offs, h_prev_ptr,
                out_ptr, coef_ptr, acc, HAS_IN, HAS_PREV, STORE, WRITE_OUT, EXACT_BF16,
            )  # fmt: skip
    idx = tl.arange(0, SUMS_PAD)
    tl.store(partial_ptr + pid * NSUMS_C + idx, acc, mask=idx < NSUMS_C)


# Launch shape per (variant, bytes per element): (elements per program, warps), the best of
# sweeps over {2048, 4096, 8192} x {4, 8} warps at FLUX.1-dev 1024^2 size (bench/RESULTS.md).
# The paper variant is instruction-bound (about a hundred instructions per element) and
# does best with few elements per thread; the plain variants are memory-bound and like big
# blocks.
TUNED = {
    ("paper", 2): (4096, 8),
    ("paper", 4): (2048, 4),
    ("rational", 2): (4096, 8),
    ("rational", 4): (4096, 4),
    ("reuse", 2): (8192, 8),
    ("reuse", 4): (8192, 4),
    ("linear", 2): (8192, 4),
    ("linear", 4): (8192, 4),
}
# Widest row (channels) the rational kernel fits and predicts from one tile; wider rows
# are walked twice in tiles of this width. At FLUX's C = 3072 one pass wins in fp32 and two
# passes over 1024-wide tiles win in 16-bit storage (bench/RESULTS.md).
RATIONAL_TILE = {2: 1024, 4: 8192}


def _row_blocks(n_rows: int, n_cols: int, block: int, tile: int, block_c: Optional[int] = None):
    """(rows per program, channels per tile); one pass when the row fits one tile."""
    if block_c is None:
        block_c = triton.next_power_of_2(n_cols)
        if n_cols > tile and not interpreting():
            block_c = min(tile, block)
    if interpreting():
        return max(1, min(triton.next_power_of_2(n_rows), (1 << 16) // block_c)), block_c
    return max(1, block // block_c), block_c


def predict(
    h_in: Optional[torch.Tensor],
    ring: torch.Tensor,
    slots: torch.Tensor,
    coef: torch.Tensor,
    h_prev: Optional[torch.Tensor],
    variant: str,
    store: bool,
    write_out: bool,
    block: Optional[int] = None,
    num_warps: Optional[int] = None,
    block_c: Optional[int] = None,
):
    """Launch the predict kernel; inputs are validated by tcpade.core.ops. Returns (out, sums).

    ``block`` (elements per program; for rational, BLOCK_R * BLOCK_C) and ``num_warps``
    override the launch shape (benchmarks sweep them); ``block_c`` forces the rational
    kernel's channel tile (tests use it to run the two-pass path on small rows). ``h_in=None``:
    a zero input (h_out = R_eff, a ring slot's shape).
    """
    v = L.variant(variant)
    shape = ring.shape[1:] if h_in is None else h_in.shape
    n = ring.numel() // ring.shape[0]
    size = 2 if ring.element_size() == 2 else 4
    tuned_block, tuned_warps = TUNED[(variant, size)]
    out = ring.new_empty(shape) if write_out else ring.new_empty(0)
    x = h_in if h_in is not None else ring  # not read without h_in (HAS_IN)
    common = dict(
        NSLOT=ring.shape[0],
        HAS_IN=h_in is not None,
        HAS_PREV=h_prev is not None,
        STORE=bool(store),
        WRITE_OUT=bool(write_out),
        EXACT_BF16=interpreting(),
        IDX64=needs_int64(n * ring.shape[0]),
    )
    if not interpreting():
        common["num_warps"] = num_warps or tuned_warps
    prev = h_prev if h_prev is not None else x
    out_arg = out if write_out else x
    if v.row_wise:
        n_cols = shape[-1]
        n_rows = n // n_cols
        block_r, block_c = _row_blocks(n_rows, n_cols, block or tuned_block, RATIONAL_TILE[size], block_c)
        grid = triton.cdiv(n_rows, block_r)
        partial = torch.empty((grid, NSUMS), dtype=torch.float32, device=ring.device)
        _predict_rational_kernel[(grid,)](
            x,
            ring,
            slots,
            coef,
            prev,
            out_arg,
            partial,
            n_rows,
            n_cols,
            n,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            ONE_PASS=block_c >= n_cols,
            **common,
        )
    else:
        block = flat_block(n, block or tuned_block)
        grid = triton.cdiv(n, block)
        partial = torch.empty((grid, NSUMS), dtype=torch.float32, device=ring.device)
        _predict_ew_kernel[(grid,)](
            x,
            ring,
            slots,
            coef,
            prev,
            out_arg,
            partial,
            n,
            n,
            VARIANT=v.code,
            BLOCK=block,
            **common,
        )
    return out, partial.sum(0)
