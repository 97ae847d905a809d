"""Plain-torch reference of every tcpade op (docs/method.md sections 2-5 and 7).

This is the specification the Triton and C++ kernels are tested against, the "torch"
line in the benchmarks, and the fallback backend when the native extension is absent.
Everything is computed in ``compute_dtype`` (float32 by default, float64 for tests);
tensors are stored in their own dtype, exactly as the kernels store them.

Shared conventions (identical in every backend):

* ``ring``: (S, *h.shape) residual history, S >= 3 slots. ``slots``: int tensor (S,)
  with slots[0] = slot of R1 (newest), slots[1] = R2, slots[2] = R3, ...,
  slots[S-1] = the write slot (for S = 3 this is R3's slot, overwritten by a write).
* ``coef``: the per-step scalars of :mod:`tcpade.core.coef`.
* ``h_prev``: optional buffer holding the previous call's h_in; read for the
  input-change correction, then overwritten with the current h_in.
* ``h_in=None``: the input is zero (the output level: the transformer's output is its own
  residual), with the numbers of an all-zero ``h_in`` and no zero tensor made or read:
  R = h_out, a prediction is R_eff itself, ``h_prev`` is zeroed.
* Returned ``sums`` (float32, ``tcpade.core.layout.SUMS`` in that order), with d1 = R1 - R2
  and d2 = R_new - R1 taken over the old R1, R2 and the newly written residual R_new:
    d11 = sum d1^2, d22 = sum d2^2, d12 = sum d1*d2      (the TSI, docs/method.md section 3)
    err2 = sum (P - R_new)^2    (P: probe prediction in the write slot; 0 without)
    r2 = sum R_new^2            nonfinite = number of non-finite stored/predicted elements
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import coef as K
from .layout import PAPER, SUMS, VARIANT_TABLE

D11, D22, D12, ERR2, R2, NONFINITE = (SUMS.index(n) for n in ("d11", "d22", "d12", "err2", "r2", "nonfinite"))
_PAPER, _RATIONAL, _REUSE, _LINEAR = (VARIANT_TABLE[n].code for n in ("paper", "rational", "reuse", "linear"))


def _slot_list(slots: torch.Tensor) -> list:
    return [int(v) for v in slots.tolist()]


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum()


def tsi_from_sums(sums) -> float:
    """TSI = 0.5 * ||u1 - u2|| = 0.5 * sqrt(2 - 2 cos) from the three sums.

    A vanishing difference (a trajectory that does not move) counts as perfectly
    stable, TSI = 0. Non-finite sums give NaN, which no threshold test passes.
    """
    s11, s22, s12 = (float(sums[i]) for i in (D11, D22, D12))
    if not all(math.isfinite(v) for v in (s11, s22, s12)):
        return float("nan")
    if s11 <= 0.0 or s22 <= 0.0:
        return 0.0
    cos = s12 / math.sqrt(s11 * s22)
    cos = min(1.0, max(-1.0, cos))
    return 0.5 * math.sqrt(max(0.0, 2.0 - 2.0 * cos))


def _sums(**named) -> torch.Tensor:
    """The sums vector in ``SUMS`` order (float64) from named 0-d tensors; absent ones are 0."""
    ref = next(iter(named.values()))
    zero = ref.new_zeros((), dtype=torch.float64)
    return torch.stack([named[n].double() if n in named else zero for n in SUMS])


def update_math(h_in, h_out, ring, s: Sequence[int], h_prev=None, probe=False, cd=torch.float32):
    """``update`` with the slot order as Python ints: no value is read back to the host, so
    this traces under torch.compile as it is (the benchmarks' eager and compiled lines).
    ``h_in=None``: a zero input (R = h_out; y - 0 is y, bit for bit)."""
    r = h_out.to(cd) if h_in is None else h_out.to(cd) - h_in.to(cd)
    r1 = ring[s[0]].to(cd)
    r2 = ring[s[1]].to(cd)
    d1 = r1 - r2
    d2 = r - r1
    named = dict(d11=(d1 * d1).sum(), d22=(d2 * d2).sum(), d12=(d1 * d2).sum(), r2=(r * r).sum())
    if probe:
        named["err2"] = ((ring[s[-1]].to(cd) - r) ** 2).sum()
    stored = r.to(ring.dtype)
    named["nonfinite"] = _nonfinite(stored)
    ring[s[-1]].copy_(stored)
    if h_prev is not None:
        if h_in is None:
            h_prev.zero_()
        else:
            h_prev.copy_(h_in)
    return _sums(**named)


def update(
    h_in: Optional[torch.Tensor],
    h_out: torch.Tensor,
    ring: torch.Tensor,
    slots: torch.Tensor,
    h_prev: Optional[torch.Tensor] = None,
    probe: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Write R = h_out - h_in into the write slot (h_in None: R = h_out); return the sums."""
    sums = update_math(h_in, h_out, ring, _slot_list(slots), h_prev, probe, compute_dtype)
    return sums.to(torch.float32 if compute_dtype != torch.float64 else torch.float64)


def paper_pade(r1, r2, P=PAPER):
    """The paper's [2/1] form with its trust region (docs/method.md section 2), before the
    fallbacks; the constants are ``tcpade.core.layout.PAPER``'s. The published curvature flag c
    is always 1 (its test compares the TSI, at most 1, with 1.4): den = 1 - den_a * s."""
    d = (r1 - r2).abs()
    mag = 0.5 * (r1.abs() + r2.abs())
    s = torch.exp(-P.s_rate * d / (mag + P.s_eps))
    num = P.num_r1 * s * r1 - s * r2
    den = 1.0 - P.den_a * s
    # |den| >= den_min, sign kept (the published guard; with s in [0, 1] it never acts).
    den = torch.where(den >= 0, den.clamp(min=P.den_min), den.clamp(max=-P.den_min))
    p = num / den
    avg = P.avg_r1 * r1 + P.avg_r2 * r2
    m = torch.maximum(P.trust_d * d, P.trust_mag * mag)
    p = avg + torch.maximum(torch.minimum(p - avg, m), -m)
    beta = P.beta_s * s + P.beta_0
    return beta * p + (1.0 - beta) * avg


def _paper_main(r1, r2, r3, r4, cf, cd):
    """The paper's main prediction with its two fallbacks, element by element."""
    pade = paper_pade(r1, r2)
    fb1 = r1 + PAPER.fb1 * (r1 - r2)
    wavg = cf[K.WAVG] * r1 + cf[K.WAVG + 1] * r2
    if r3 is not None:
        wavg = wavg + cf[K.WAVG + 2] * r3
    if r4 is not None:
        wavg = wavg + cf[K.WAVG + 3] * r4
    fb = torch.where(torch.isfinite(fb1), fb1, wavg)
    return torch.where(torch.isfinite(pade), pade, fb)


def _rational_main(r1, r2, r3, cf, cd, rows_shape):
    """Time-aware [1/1] Pade with one denominator per token row (docs/method.md section 5)."""
    c = r1.shape[-1]
    if float(cf[K.ALP0]) == 0.0:
        # No R3 term (fewer than three residuals, or a degenerate grid): R3 is not read,
        # so a stale non-finite value in its slot cannot leak in through 0 * NaN.
        r3 = torch.zeros_like(r2)
    y0, y1, y2 = (x.reshape(-1, c) for x in (r3, r2, r1))
    tau0, tau1, tau2 = cf[K.TAU0], cf[K.TAU1], cf[K.TAU2]
    S = cf[K.ALP0] * y0 + cf[K.ALP1] * y1 + cf[K.ALP2] * y2
    T = cf[K.ALP0] * tau0 * y0 + cf[K.ALP1] * tau1 * y1 + cf[K.ALP2] * tau2 * y2
    lin = cf[K.LAM1] * y1 + cf[K.LAM2] * y2
    lty = cf[K.LAM1] * tau1 * y1 + cf[K.LAM2] * tau2 * y2
    st = (S * T).sum(-1)
    tt = (T * T).sum(-1)
    b1 = -st / (tt + 1e-30)
    bmax = cf[K.BMAX]
    b1 = torch.clamp(b1, -bmax, bmax)  # NaN stays NaN
    if float(cf[K.KAPPA]) > 0.0:
        ll = (lty * lty).sum(-1)
        dd = ((y2 - y1) ** 2).sum(-1)
        lim = cf[K.KAPPA] * torch.sqrt(dd)
        dev = b1.abs() * torch.sqrt(ll)
        scale = torch.where(dev > lim, lim / torch.where(dev > lim, dev, torch.ones_like(dev)), torch.ones_like(dev))
        b1 = b1 * scale
    out = lin + b1[:, None] * lty
    return out.reshape(rows_shape)


def r2_unread(code: int, cf) -> bool:
    """Does a prediction of variant ``code`` with coefficients ``cf`` give R2 no weight at all
    (rational or linear with one residual stored, or a grid degenerate to R1)? Then R2 is not
    read: its terms read R1 instead, with zero weight."""
    return code in (_RATIONAL, _LINEAR) and all(float(cf[i]) == 0.0 for i in (K.LAM1, K.ALP0, K.ALP1, K.C2))


def predict_math(h_in, ring, s: Sequence[int], cf, h_prev=None, variant="paper", store=False, write_out=True,
                 cd=torch.float32):
    """``predict`` with the slot order as Python ints and ``cf`` any sequence indexed by
    the tcpade.core.coef positions (a tensor, or Python floats: then nothing is read back to the
    host and this traces under torch.compile as it is). Returns (h_out or None, sums).
    ``h_in=None``: a zero input, as the scalar 0.0 (0 + R_eff and 0 - h_prev round as with a
    zero tensor, so the numbers are those of an all-zero h_in)."""
    code = K.check_variant(variant)
    nslot = ring.shape[0]
    r1 = ring[s[0]].to(cd)
    # Rational / linear with no weight on R2 (one residual stored: the prediction is R1): R2 is not
    # read, its terms read R1 with zero weight, so a stale non-finite value in R2's slot cannot
    # leak in through 0 * NaN (``r2_unread``; every backend does the same).
    r2 = r1 if r2_unread(code, cf) else ring[s[1]].to(cd)
    r3 = ring[s[2]].to(cd)
    r4 = ring[s[3]].to(cd) if nslot >= 4 else None
    if code == _REUSE:
        rhat = r1
    else:
        if code == _PAPER:
            main = _paper_main(r1, r2, r3, r4, cf, cd)
        elif code == _RATIONAL:
            main = _rational_main(r1, r2, r3, cf, cd, r1.shape)
        else:
            main = cf[K.LAM1] * r2 + cf[K.LAM2] * r1
        blend = cf[K.C1] * r1 + cf[K.C2] * r2
        rhat = blend + cf[K.W_MAIN] * main if float(cf[K.W_MAIN]) != 0.0 else blend
    x = 0.0 if h_in is None else h_in.to(cd)
    if h_prev is not None:
        if float(cf[K.GAMMA]) != 0.0:
            rhat = rhat + cf[K.GAMMA] * (x - h_prev.to(cd))
        if h_in is None:
            h_prev.zero_()
        else:
            h_prev.copy_(h_in)
    named = dict(r2=(rhat * rhat).sum())
    if store:
        d1 = r1 - r2
        d2 = rhat - r1
        named.update(d11=(d1 * d1).sum(), d22=(d2 * d2).sum(), d12=(d1 * d2).sum())
    stored = rhat.to(ring.dtype)
    bad = ~torch.isfinite(stored)
    out = None
    if write_out:
        out = (x + rhat).to(ring.dtype)
        bad_out = ~torch.isfinite(out)
        bad = bad | bad_out
        r1_ok = torch.where(torch.isfinite(r1), r1, torch.zeros_like(r1))  # a non-finite R1 contributes nothing
        out = torch.where(bad_out, (x + r1_ok).to(ring.dtype), out)
    named["nonfinite"] = bad.sum()
    if store:
        ring[s[-1]].copy_(stored)
    return out, _sums(**named)


def predict(
    h_in: Optional[torch.Tensor],
    ring: torch.Tensor,
    slots: torch.Tensor,
    coef: torch.Tensor,
    h_prev: Optional[torch.Tensor] = None,
    variant: str = "paper",
    store: bool = False,
    write_out: bool = True,
    compute_dtype: torch.dtype = torch.float32,
):
    """Predict this step's residual; return (h_out or an empty tensor, sums).

    R_hat = w_main * main + c1 * R1 + c2 * R2 (reuse: R_hat = R1), then
    R_eff = R_hat + gamma * (h_in - h_prev) when h_prev is given, h_out = h_in + R_eff
    (``h_in=None``: a zero input, h_out = R_eff).

    Non-finite predictions: every element of h_out that is not finite (after rounding to
    the storage dtype) is replaced by h_in + R1, R1 the newest stored residual where it is
    finite and 0 where not (reuse of the last residual), so a skipped step never hands NaN or Inf to the model. The
    ``nonfinite`` sum counts the elements whose raw prediction (R_eff as stored, or
    h_in + R_eff) was not finite, so the caller learns of the fallback from the sums,
    without waiting for them now.

    With ``store`` R_eff is written into the write slot as predicted (the paper's history
    rule, or a probe prediction for the error policy; a non-finite value is stored as it
    is and counted) and d11, d22, d12 (the TSI of R_eff as the new residual) are
    computed; without it they are 0. r2 = sum R_eff^2 and nonfinite are always computed.
    """
    cd = compute_dtype
    cf = coef.to(dtype=cd, device="cpu")
    out, sums = predict_math(h_in, ring, _slot_list(slots), cf, h_prev, variant, store, write_out, cd)
    if out is None:
        out = ring.new_empty(0)
    return out, sums.to(torch.float32 if cd != torch.float64 else torch.float64)
