"""Plain-torch reference of every tcpade op (docs/method.md sections 2-5 and 7).

This is the specification the Triton and C++ kernels are tested against, the "torch"
line in the benchmarks, and the fallback backend when the native extension is absent.
Everything is computed in ``compute_dtype`` (float32 by default, float64 for tests);
tensors are stored in their own dtype, exactly as the kernels store them.

Shared conventions (identical in every backend):

* ``ring``: (S, *h.shape) residual history, S >= 3 slots. ``slots``: int tensor (S,)
  with slots[0] = slot of R1 (newest), slots[1] = R2, slots[2] = R3, ...,
  slots[S-1] = the write slot (for S = 3 this is R3's slot, overwritten by a write).
* ``coef``: the per-step scalars of :mod:`tcpade.coef`.
* ``h_prev``: optional buffer holding the previous call's h_in; read for the
  input-change correction, then overwritten with the current h_in.
* Returned ``sums`` (float32, 8 entries), with d1 = R1 - R2 and d2 = R_new - R1
  taken over the old R1, R2 and the newly written residual R_new:
    0: sum d1^2   1: sum d2^2   2: sum d1*d2          (the TSI, docs/method.md section 3)
    3: sum (P - R_new)^2        (P: probe prediction in the write slot; 0 without)
    4: sum R_new^2              5: number of non-finite stored/output elements
    6: sum P^2                  7: reserved (0)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import coef as K

NSUMS = 8


def _slot_list(slots: torch.Tensor) -> list:
    return [int(v) for v in slots.tolist()]


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum()


def tsi_from_sums(sums) -> float:
    """TSI = 0.5 * ||u1 - u2|| = 0.5 * sqrt(2 - 2 cos) from the three sums.

    A vanishing difference (a trajectory that does not move) counts as perfectly
    stable, TSI = 0. Non-finite sums give NaN, which no threshold test passes.
    """
    s11, s22, s12 = (float(sums[i]) for i in range(3))
    if not all(math.isfinite(v) for v in (s11, s22, s12)):
        return float("nan")
    if s11 <= 0.0 or s22 <= 0.0:
        return 0.0
    cos = s12 / math.sqrt(s11 * s22)
    cos = min(1.0, max(-1.0, cos))
    return 0.5 * math.sqrt(max(0.0, 2.0 - 2.0 * cos))


def update(
    h_in: torch.Tensor,
    h_out: torch.Tensor,
    ring: torch.Tensor,
    slots: torch.Tensor,
    h_prev: Optional[torch.Tensor] = None,
    probe: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Write R = h_out - h_in into the write slot; return the sums."""
    s = _slot_list(slots)
    cd = compute_dtype
    r = h_out.to(cd) - h_in.to(cd)
    r1 = ring[s[0]].to(cd)
    r2 = ring[s[1]].to(cd)
    d1 = r1 - r2
    d2 = r - r1
    sums = torch.zeros(NSUMS, dtype=torch.float64, device=h_in.device)
    sums[0] = (d1 * d1).sum().double()
    sums[1] = (d2 * d2).sum().double()
    sums[2] = (d1 * d2).sum().double()
    sums[4] = (r * r).sum().double()
    if probe:
        p = ring[s[-1]].to(cd)
        sums[3] = ((p - r) ** 2).sum().double()
        sums[6] = (p * p).sum().double()
    stored = r.to(ring.dtype)
    sums[5] = _nonfinite(stored).double()
    ring[s[-1]].copy_(stored)
    if h_prev is not None:
        h_prev.copy_(h_in)
    return sums.to(torch.float32 if cd != torch.float64 else torch.float64)


def _paper_main(r1, r2, r3, r4, cf, cd):
    """The paper's [2/1] form with trust region and fallbacks (docs/method.md section 2)."""
    d = (r1 - r2).abs()
    mag = 0.5 * (r1.abs() + r2.abs())
    s = torch.exp(-5.0 * d / (mag + 1e-7))
    num = 2.0 * s * r1 - s * r2
    den = 1.0 - 0.1 * s * cf[K.PADE_C]
    den = torch.where(den >= 0, den.clamp(min=1e-5), den.clamp(max=-1e-5))
    p = num / den
    avg = 0.6 * r1 + 0.4 * r2
    m = torch.maximum(0.5 * d, 0.1 * mag)
    p = avg + torch.maximum(torch.minimum(p - avg, m), -m)
    beta = 0.7 * s + 0.3
    pade = beta * p + (1.0 - beta) * avg
    fb1 = r1 + 0.5 * (r1 - r2)
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
    b1 = -st / (tt * (1.0 + cf[K.MU]) + 1e-30)
    bmax = cf[K.BMAX]
    b1 = torch.maximum(torch.minimum(b1, bmax), -bmax)
    if float(cf[K.KAPPA]) > 0.0:
        ll = (lty * lty).sum(-1)
        dd = ((y2 - y1) ** 2).sum(-1)
        lim = cf[K.KAPPA] * torch.sqrt(dd)
        dev = b1.abs() * torch.sqrt(ll)
        scale = torch.where(dev > lim, lim / torch.where(dev > lim, dev, torch.ones_like(dev)), torch.ones_like(dev))
        b1 = b1 * scale
    out = lin + b1[:, None] * lty
    return out.reshape(rows_shape)


def predict(
    h_in: torch.Tensor,
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

    R_hat = W_MAIN * main + C1 * R1 + C2 * R2 (reuse: R_hat = R1), then
    R_eff = R_hat + GAMMA * (h_in - h_prev) when h_prev is given, h_out = h_in + R_eff.
    With ``store`` R_eff is written into the write slot (the paper's history rule, or a
    probe prediction for the error policy) and sums 0-2 (the TSI of R_eff as the new
    residual) are computed; without it they are 0. sums[4] = sum R_eff^2 and sums[5]
    (non-finite R_eff or h_out elements, as stored) are always computed.
    """
    vid = K.check_variant(variant)
    s = _slot_list(slots)
    cd = compute_dtype
    cf = coef.to(dtype=cd, device="cpu")
    nslot = ring.shape[0]
    r1 = ring[s[0]].to(cd)
    r2 = ring[s[1]].to(cd)
    r3 = ring[s[2]].to(cd)
    r4 = ring[s[3]].to(cd) if nslot >= 4 else None
    if vid == 2:  # reuse
        rhat = r1
    else:
        if vid == 0:
            main = _paper_main(r1, r2, r3, r4, cf, cd)
        elif vid == 1:
            main = _rational_main(r1, r2, r3, cf, cd, r1.shape)
        else:
            main = cf[K.LAM1] * r2 + cf[K.LAM2] * r1
        blend = cf[K.C1] * r1 + cf[K.C2] * r2
        rhat = blend + cf[K.W_MAIN] * main if float(cf[K.W_MAIN]) != 0.0 else blend
    x = h_in.to(cd)
    if h_prev is not None:
        if float(cf[K.GAMMA]) != 0.0:
            rhat = rhat + cf[K.GAMMA] * (x - h_prev.to(cd))
        h_prev.copy_(h_in)
    sums = torch.zeros(NSUMS, dtype=torch.float64, device=h_in.device)
    if store:
        d1 = r1 - r2
        d2 = rhat - r1
        sums[0] = (d1 * d1).sum().double()
        sums[1] = (d2 * d2).sum().double()
        sums[2] = (d1 * d2).sum().double()
    sums[4] = (rhat * rhat).sum().double()
    stored = rhat.to(ring.dtype)
    bad = ~torch.isfinite(stored)
    if write_out:
        out = (x + rhat).to(h_in.dtype)
        bad = bad | ~torch.isfinite(out)
    else:
        out = h_in.new_empty(0)
    sums[5] = bad.sum().double()
    if store:
        ring[s[-1]].copy_(stored)
    return out, sums.to(torch.float32 if cd != torch.float64 else torch.float64)
