"""tcpade::predict on every backend, dtype, variant, stage and odd shape, against float64."""

import math

import pytest
import torch
from helpers import DTYPE_IDS, DTYPES, SHAPES, assert_close, gen, perm_slots, randn, smooth_ring

from tcpade import coef as K
from tcpade.core import layout as L
from tcpade import ops, reference

NONFINITE = L.SUMS.index("nonfinite")

# Non-uniform, decreasing sigmas as a shifted flow-matching schedule has (R1 newest).
TIMES = [0.61, 0.74, 0.93]
T_TARGET = 0.45


def _run(backend, dtype, shape, nslot, variant, stage, store, write_out, with_prev, kappa=0.0, seed=0):
    device, _ = backend
    g = gen(seed)
    h_in = randn(shape, dtype, device, g)
    ring = smooth_ring(shape, nslot, dtype, device, g)
    slots = perm_slots(nslot, device, g)
    prev = (h_in.double() - 0.1 * randn(shape, torch.float64, "cpu", g).to(device)).to(dtype) if with_prev else None
    cf = K.build_coef(variant, stage, TIMES, T_TARGET, nslot, nslot, kappa=kappa)

    def ref(cd):
        rr = ring.cpu().clone()
        rp = prev.cpu().clone() if with_prev else None
        out, sums = reference.predict(
            h_in.cpu(), rr, slots.cpu(), torch.tensor(cf, dtype=cd), rp, variant, store, write_out, cd
        )
        return out, sums, rr

    out64, sums64, ring64 = ref(torch.float64)
    low = ref(dtype) if dtype != torch.float32 else (None, None, None)
    got_ring = ring.clone()
    got_prev = prev.clone() if with_prev else None
    out, sums = ops.predict(h_in, got_ring, slots, K.coef_tensor(cf, device), got_prev, variant, store, write_out)
    return dict(
        out=out,
        sums=sums,
        ring=got_ring,
        prev=got_prev,
        h_in=h_in,
        ring0=ring,
        slots=slots,
        out64=out64,
        sums64=sums64,
        ring64=ring64,
        low=low,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", K.VARIANTS)
@pytest.mark.parametrize("stage", K.STAGES)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("nslot", [3, 4])
def test_predict_matches_reference(backend, dtype, variant, stage, shape, nslot):
    for store, write_out, with_prev in [(False, True, True), (True, True, False), (True, False, True)]:
        r = _run(
            backend,
            dtype,
            shape,
            nslot,
            variant,
            stage,
            store,
            write_out,
            with_prev,
            kappa=1.5 if variant == "rational" else 0.0,
            seed=nslot * 10 + len(shape),
        )
        what = f"{variant}/{stage} store={store} write_out={write_out} prev={with_prev}"
        if write_out:
            assert r["out"].shape == r["h_in"].shape and r["out"].dtype == dtype
            assert_close(r["out"], r["out64"], dtype, r["low"][0], what=what + " out")
        else:
            assert r["out"].numel() == 0
        # The ring changes only in the write slot, and only with store.
        assert_close(r["ring"], r["ring64"], dtype, r["low"][2], what=what + " ring")
        if not store:
            assert torch.equal(r["ring"], r["ring0"])
        if with_prev:
            assert torch.equal(r["prev"], r["h_in"]), "h_prev must be overwritten with h_in"
        s, s64 = r["sums"].tolist(), r["sums64"].tolist()
        for i in (0, 1, 2, 4):
            assert math.isclose(s[i], s64[i], rel_tol=1e-4, abs_tol=1e-3), (what, i, s, s64)
        assert s[5] == 0.0
        if not store:
            assert s[0] == s[1] == s[2] == 0.0


def _manual(shape, dtype, device, r1, r2, r3, r4=None):
    nslot = 3 if r4 is None else 4
    ring = torch.stack([r1, r2, r3] + ([r4] if r4 is not None else [])).to(dtype).to(device)
    slots = torch.arange(nslot, dtype=torch.int32, device=device)
    return ring, slots


def test_stage_blends_are_the_papers():
    g = gen(12)
    r1 = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    r2 = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    ring, slots = _manual(r1.shape, torch.float64, "cpu", r1, r2, torch.zeros_like(r1))
    zero = torch.zeros_like(r1)

    def run(stage):
        cf = torch.tensor(K.build_coef("paper", stage, TIMES, T_TARGET, 3, 3), dtype=torch.float64)
        return reference.predict(zero, ring, slots, cf, None, "paper", False, True, torch.float64)[0]

    mid = run("middle")
    w = L.PAPER.stage_weights
    assert w["middle"] == (1.0, 0.0, 0.0) and w["early"][0] == 0.0 and w["late"][0] == 1.0
    assert torch.allclose(run("early"), w["early"][1] * r1 + w["early"][2] * r2, atol=1e-14)
    assert torch.allclose(run("late"), mid + w["late"][1] * r1 + w["late"][2] * r2, atol=1e-14)


def test_paper_input_change_correction(backend):
    device, _ = backend
    g = gen(13)
    shape = (1, 5, 24)
    r1, r2, r3 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    ring, slots = _manual(shape, torch.float32, device, r1, r2, r3)
    h_in = randn(shape, torch.float32, device, g)
    prev = randn(shape, torch.float32, device, g)
    cf = K.coef_tensor(K.build_coef("paper", "middle", TIMES, T_TARGET, 3, 3), device)
    no_prev, _ = ops.predict(h_in, ring.clone(), slots, cf, None, "paper", False, True)
    with_prev, _ = ops.predict(h_in, ring.clone(), slots, cf, prev.clone(), "paper", False, True)
    want = no_prev.double() + L.PAPER.gamma * (h_in.double() - prev.double())
    assert (with_prev.double() - want).abs().max().item() < 1e-5


def test_rational_recovers_exact_rational_fp64():
    """(a + b tau) / (1 + c tau) sampled at three non-uniform times: exact to 1e-6 in fp64."""
    g = gen(21)
    shape = (2, 6, 31)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    # One denominator per token row (shared over channels), within the pole guard.
    c = (torch.rand(shape[0], shape[1], 1, generator=g, dtype=torch.float64) - 0.5) * 0.4
    h = T_TARGET - TIMES[0]

    def y(t):
        tau = (t - T_TARGET) / h
        return (a + b * tau) / (1 + c * tau)

    ring, slots = _manual(shape, torch.float64, "cpu", *(y(t) for t in TIMES))
    cf = torch.tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3), dtype=torch.float64)
    out, _ = reference.predict(
        torch.zeros(shape, dtype=torch.float64), ring, slots, cf, None, "rational", False, True, torch.float64
    )
    assert (out - a).abs().max().item() < 1e-6
    # A per-element linear extrapolation would be far off on the same data.
    lin = torch.tensor(K.build_coef("linear", "middle", TIMES, T_TARGET, 3, 3), dtype=torch.float64)
    out_lin, _ = reference.predict(
        torch.zeros(shape, dtype=torch.float64), ring, slots, lin, None, "linear", False, True, torch.float64
    )
    assert (out_lin - a).abs().max().item() > 1e-2


def test_rational_kernels_recover_rational_fp32(backend):
    device, _ = backend
    g = gen(22)
    shape = (1, 9, 65)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    c = (torch.rand(1, 9, 1, generator=g, dtype=torch.float64) - 0.5) * 0.4
    h = T_TARGET - TIMES[0]
    ys = [(a + b * ((t - T_TARGET) / h)) / (1 + c * ((t - T_TARGET) / h)) for t in TIMES]
    ring, slots = _manual(shape, torch.float32, device, *ys)
    cf = K.coef_tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3), device)
    out, _ = ops.predict(torch.zeros(shape, device=device), ring, slots, cf, None, "rational", False, True)
    # fp32 inputs carry 6e-8 relative rounding, amplified by the divided differences
    # (weights up to ~10 here): 1e-4 leaves a wide margin and still rejects linear (~1e-1).
    assert (out.cpu().double() - a).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["rational", "linear"])
def test_reduces_to_linear_on_linear_data(backend, variant):
    device, _ = backend
    g = gen(23)
    shape = (2, 3, 50)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    h = T_TARGET - TIMES[0]
    ys = [a + b * ((t - T_TARGET) / h) for t in TIMES]
    ring, slots = _manual(shape, torch.float64, "cpu", *ys)
    cf = K.build_coef(variant, "middle", TIMES, T_TARGET, 3, 3)
    out64, _ = reference.predict(
        torch.zeros(shape, dtype=torch.float64),
        ring,
        slots,
        torch.tensor(cf, dtype=torch.float64),
        None,
        variant,
        False,
        True,
        torch.float64,
    )
    assert (out64 - a).abs().max().item() < 1e-12
    ring32, slots32 = _manual(shape, torch.float32, device, *ys)
    out, _ = ops.predict(
        torch.zeros(shape, device=device), ring32, slots32, K.coef_tensor(cf, device), None, variant, False, True
    )
    assert (out.cpu().double() - a).abs().max().item() < 1e-5


def test_pole_guard_keeps_output_bounded(backend):
    """Data whose fitted denominator puts the pole right at the target (b1 -> infinity)."""
    device, _ = backend
    shape = (1, 4, 16)
    cf = K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3, delta=0.3)
    tau = [cf[K.TAU0], cf[K.TAU1], cf[K.TAU2]]
    alp = [cf[K.ALP0], cf[K.ALP1], cf[K.ALP2]]
    # T = sum alp_i tau_i y_i is ~1e-6 while S = sum alp_i y_i is O(1): b1 = -S*T/T^2 ~ 1e6.
    null_t = torch.tensor([alp[1] * tau[1], -alp[0] * tau[0], 0.0], dtype=torch.float64)
    eps = torch.tensor([0.0, 0.0, 1e-6 / (alp[2] * tau[2])], dtype=torch.float64)
    g = gen(24)
    amp = 1.0 + torch.rand(shape, generator=g, dtype=torch.float64)
    y = [(null_t[i] + eps[i]) * amp for i in range(3)]  # (R3, R2, R1)
    ring, slots = _manual(shape, torch.float32, device, y[2], y[1], y[0])
    zero = torch.zeros(shape, device=device)
    out, sums = ops.predict(zero, ring, slots, K.coef_tensor(cf, device), None, "rational", False, True)
    unguarded = list(cf)
    unguarded[K.BMAX] = 1e30
    out_u, _ = ops.predict(zero, ring, slots, K.coef_tensor(unguarded, device), None, "rational", False, True)
    r1, r2 = y[2], y[1]
    lin = cf[K.LAM1] * r2 + cf[K.LAM2] * r1
    lty = cf[K.LAM1] * tau[1] * r2 + cf[K.LAM2] * tau[2] * r1
    bound = lin.abs() + cf[K.BMAX] * lty.abs()
    assert out_u.abs().max().item() > 1e3 * bound.max().item(), "test data must actually blow up unguarded"
    assert torch.isfinite(out).all() and sums[NONFINITE].item() == 0.0
    assert (out.cpu().double().abs() <= bound * (1 + 1e-5) + 1e-6).all()
    # The guard is |b1| <= (1 - delta) / max|tau|: 1 + b1 * tau >= delta on [tau0, 0].
    assert math.isclose(cf[K.BMAX] * max(abs(t) for t in tau), 0.7)


def test_kappa_bounds_departure_from_linear(backend):
    device, _ = backend
    g = gen(25)
    shape = (1, 6, 40)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    slots = torch.arange(3, dtype=torch.int32, device=device)
    zero = torch.zeros(shape, device=device)
    cf_lin = K.coef_tensor(K.build_coef("linear", "middle", TIMES, T_TARGET, 3, 3), device)
    lin, _ = ops.predict(zero, ring, slots, cf_lin, None, "linear", False, True)
    kappa = 0.05
    cf = K.coef_tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3, kappa=kappa), device)
    out, _ = ops.predict(zero, ring, slots, cf, None, "rational", False, True)
    dev = (out - lin).double().norm(dim=-1)
    lim = kappa * (ring[0] - ring[1]).double().norm(dim=-1)
    assert (dev <= lim * (1 + 1e-4) + 1e-6).all()


def test_degenerate_time_grids_degrade_in_order():
    # Repeated third time -> linear; repeated second time -> reuse; target == newest -> reuse.
    lin = K.time_weights([0.5, 0.6, 0.6], 0.4, 3)
    assert lin["alp"] == (0.0, 0.0, 0.0) and lin["lam"] != (0.0, 1.0)
    assert K.time_weights([0.5, 0.5, 0.7], 0.4, 3)["lam"] == (0.0, 1.0)
    assert K.time_weights([0.5, 0.6, 0.7], 0.5, 3)["lam"] == (0.0, 1.0)
    assert K.time_weights([0.5, float("nan"), 0.7], 0.4, 3)["lam"] == (0.0, 1.0)
    assert K.time_weights([0.5, 0.6, 0.7], 0.4, 1)["lam"] == (0.0, 1.0)
    # Uniform grid: linear extrapolation (lam1 R2 + lam2 R1) is 2 R1 - R2.
    assert K.time_weights([0.5, 0.6, 0.7], 0.4, 3)["lam"] == pytest.approx((-1.0, 2.0))


NAN_CASES = ["h_in", "r1", "r2", "prev"]


@pytest.mark.parametrize("variant", K.VARIANTS)
@pytest.mark.parametrize("where", NAN_CASES)
def test_predict_nan_is_visible(backend, variant, where):
    """A NaN in any input the prediction uses is counted: the device-side fallback to
    h_in + R1 (R1 where finite, else 0) keeps h_out finite where h_in is, and never hides
    the count."""
    device, _ = backend
    g = gen(31)
    shape = (1, 5, 24)
    h_in = randn(shape, torch.float32, device, g)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    slots = torch.tensor([1, 2, 0], dtype=torch.int32, device=device)
    prev = randn(shape, torch.float32, device, g)
    if where == "h_in":
        h_in[0, 1, 3] = float("nan")
    elif where == "r1":
        ring[1, 0, 2, 7] = float("nan")
    elif where == "r2":
        ring[2, 0, 2, 7] = float("inf")
    else:
        prev[0, 3, 3] = float("nan")
    cf = K.build_coef(variant, "middle", TIMES, T_TARGET, 3, 3, gamma=0.2)
    out, sums = ops.predict(h_in, ring, slots, K.coef_tensor(cf, device), prev, variant, True, True)
    used = not (where == "r2" and variant == "reuse")
    if used:
        assert sums[NONFINITE].item() >= 1, f"NaN in {where} hidden by {variant}"
        # h_out is non-finite only where its fallback h_in + R1 (a non-finite R1 counting as 0)
        # is non-finite too: only a NaN in h_in itself stays.
        assert bool(torch.isfinite(out).all()) == (where != "h_in")
    else:
        assert sums[NONFINITE].item() == 0 and torch.isfinite(out).all()


def test_gamma_zero_ignores_nonfinite_prev(backend):
    device, _ = backend
    g = gen(32)
    shape = (1, 5, 24)
    h_in = randn(shape, torch.float32, device, g)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    prev = torch.full(shape, float("nan"), device=device)
    cf = K.coef_tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3, gamma=0.0), device)
    out, sums = ops.predict(h_in, ring.clone(), slots, cf, prev, "rational", False, True)
    ref, _ = ops.predict(h_in, ring.clone(), slots, cf, None, "rational", False, True)
    # Not bit-equal on a GPU: the two specialisations may contract multiply-adds into
    # FMAs differently (seen on an H200, 2026-11-28), so compare at fp32 rounding level.
    assert sums[NONFINITE].item() == 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_paper_early_stage_ignores_nonfinite_main(backend):
    """W_MAIN = 0 must not turn a non-finite main prediction into NaN through 0 * NaN."""
    device, _ = backend
    shape = (1, 2, 8)
    r1 = torch.full(shape, 3e38, dtype=torch.float64)  # 2*s*R1 overflows fp32 in the Pade form
    ring, slots = _manual(shape, torch.float32, device, r1, r1 * 0.99, r1 * 0.98)
    cf = K.build_coef("paper", "early", TIMES, T_TARGET, 3, 3)
    out, sums = ops.predict(
        torch.zeros(shape, device=device), ring, slots, K.coef_tensor(cf, device), None, "paper", False, True
    )
    # Finite without the fallback to h_in + R1: nothing non-finite was predicted.
    assert torch.isfinite(out).all() and sums[NONFINITE].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_c", [16, 64])
def test_rational_two_pass_tiles(dtype, block_c):
    """Rows wider than one tile (> 1024 channels at 2 bytes, > 8192 at fp32, on a GPU) are fitted in a first pass over
    the row and predicted in a second; force small tiles to run that path on small rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in ops.available_backends(device):
        pytest.skip("no Triton backend here")
    from tcpade import kernels

    g = gen(41)
    shape = (2, 5, 129)
    h_in = randn(shape, dtype, device, g)
    ring = smooth_ring(shape, 3, dtype, device, g)
    slots = perm_slots(3, device, g)
    prev = randn(shape, dtype, device, g)
    cf = K.build_coef("rational", "late", TIMES, T_TARGET, 3, 3, kappa=0.8, gamma=0.1)
    r64, p64 = ring.cpu().clone(), prev.cpu().clone()
    out64, sums64 = reference.predict(
        h_in.cpu(), r64, slots.cpu(), torch.tensor(cf, dtype=torch.float64), p64, "rational", True, True, torch.float64
    )
    got_ring, got_prev = ring.clone(), prev.clone()
    out, sums = kernels.predict(
        h_in, got_ring, slots, K.coef_tensor(cf, device), got_prev, "rational", True, True, block_c=block_c
    )
    low_out = low_ring = None
    if dtype != torch.float32:  # the same math in plain torch at the storage dtype
        low_ring = ring.cpu().clone()
        low_out, _ = reference.predict(
            h_in.cpu(),
            low_ring,
            slots.cpu(),
            torch.tensor(cf, dtype=dtype),
            prev.cpu().clone(),
            "rational",
            True,
            True,
            dtype,
        )
    assert_close(out, out64, dtype, low_out, what="two-pass rational out")
    assert_close(got_ring, r64, dtype, low_ring, what="two-pass rational ring")
    for i in (0, 1, 2, 4):
        assert math.isclose(sums[i].item(), sums64[i].item(), rel_tol=1e-4, abs_tol=1e-3)


def test_rational_does_not_read_r3_without_weight(backend):
    """With two residuals stored the R3 slot is stale (or garbage): a NaN there must not
    reach a prediction that gives it no weight (0 * NaN would poison the whole row)."""
    device, _ = backend
    g = gen(51)
    shape = (1, 6, 40)
    h_in = randn(shape, torch.float32, device, g)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    slots = torch.tensor([1, 2, 0], dtype=torch.int32, device=device)
    ring[0] = float("nan")  # R3's slot
    cf = K.build_coef("rational", "middle", TIMES, T_TARGET, 2, 3)
    assert cf[K.ALP0] == 0.0
    out, sums = ops.predict(h_in, ring, slots, K.coef_tensor(cf, device), None, "rational", False, True)
    assert sums[NONFINITE].item() == 0 and torch.isfinite(out).all()
    lin = K.coef_tensor(K.build_coef("linear", "middle", TIMES, T_TARGET, 2, 3), device)
    ref, _ = ops.predict(h_in, ring, slots, lin, None, "linear", False, True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # With three residuals the same NaN is used, and visible.
    cf3 = K.coef_tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3), device)
    _, sums3 = ops.predict(h_in, ring, slots, cf3, None, "rational", False, True)
    assert sums3[5].item() > 0


# ------------------------------------------------------------- non-finite predictions


def _fallback_case(backend, dtype, shape, variant, poison, seed):
    """A prediction that is non-finite at known elements: ``poison`` "prev" puts +-inf / NaN
    into h_prev (with an input correction, every variant's R_eff is then non-finite exactly
    there), "r2" puts inf into R2 (the paper and linear predictions fail there, rational's
    whole row)."""
    device, _ = backend
    g = gen(seed)
    h_in = randn(shape, dtype, device, g)
    ring = smooth_ring(shape, 3, dtype, device, g)
    slots = perm_slots(3, device, g)
    prev = randn(shape, dtype, device, g)
    flat = [(0, 0), (shape[-2] - 1, shape[-1] - 1), (shape[-2] // 2, 3)]
    vals = [float("inf"), float("-inf"), float("nan")]
    target = prev if poison == "prev" else ring[int(slots[1])]
    for (r, c), v in zip(flat, vals if poison == "prev" else [float("inf")] * 3):
        target[..., r, c] = v
    cf = K.build_coef(variant, "middle", TIMES, T_TARGET, 3, 3, gamma=0.5 if poison == "prev" else 0.0)
    return h_in, ring, slots, prev if poison == "prev" else None, cf


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", K.VARIANTS)
@pytest.mark.parametrize("poison", ["prev", "r2"])
@pytest.mark.parametrize("shape", [(1, 5, 33), (2, 3, 17)], ids=str)
def test_nonfinite_prediction_falls_back_to_last_residual(backend, dtype, variant, poison, shape):
    """Every non-finite element of h_out is h_in + R1 instead (the same rounding on every
    backend: one fp32 add, one rounding); the nonfinite sum counts the raw non-finite
    predictions; a stored prediction keeps the raw values. Everything else is the float64
    reference's (which falls back the same way)."""
    if variant == "reuse" and poison == "r2":
        pytest.skip("reuse never reads R2")
    h_in, ring, slots, prev, cf = _fallback_case(backend, dtype, shape, variant, poison, seed=len(shape) + 40)
    r1 = ring[int(slots[0])]
    fallback = (h_in.float() + r1.float()).to(dtype)
    for store in (False, True):
        ref_ring = ring.cpu().clone()
        ref_prev = prev.cpu().clone() if prev is not None else None
        out64, sums64 = reference.predict(h_in.cpu(), ref_ring, slots.cpu(), torch.tensor(cf, dtype=torch.float64),
                                          ref_prev, variant, store, True, torch.float64)  # fmt: skip
        got_ring = ring.clone()
        got_prev = prev.clone() if prev is not None else None
        out, sums = ops.predict(h_in, got_ring, slots, K.coef_tensor(cf, h_in.device), got_prev, variant, store, True)
        bad64 = ~torch.isfinite(out64)
        assert not bad64.any(), "the float64 reference falls back as well"
        raw_bad = ~torch.isfinite(ref_ring[int(slots[-1])]) if store else None
        assert torch.isfinite(out).all(), f"{variant} store={store}: a non-finite h_out reached the caller"
        n = int(sums[NONFINITE].item())
        assert n > 0 and n == int(sums64[NONFINITE].item()), (n, sums64.tolist())
        # The fallback elements are exactly h_in + R1; every other element is the prediction.
        fell = out64 == (h_in.cpu().double() + r1.cpu().double()).to(dtype)
        if poison == "prev":
            n_poisoned = int((~torch.isfinite(prev)).sum())
            assert n == n_poisoned and int(fell.sum()) >= n_poisoned
        sel = fell.to(out.device)
        assert torch.equal(out[sel], fallback[sel])
        if (~sel).any():
            assert_close(out[~sel], out64[~fell], dtype, what=f"{variant} store={store}, other elements")
        if store:
            stored = got_ring[int(slots[-1])].cpu()
            assert torch.equal(~torch.isfinite(stored), raw_bad), "a stored prediction keeps its raw values"
            assert int((~torch.isfinite(stored)).sum()) == n


def test_nonfinite_fallback_in_float64_reference():
    g = gen(47)
    shape = (1, 3, 7)
    ring = smooth_ring(shape, 3, torch.float64, "cpu", g)
    h_in = torch.randn(shape, generator=g, dtype=torch.float64)
    prev = h_in.clone()
    prev[0, 1, 2] = float("nan")
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    cf = torch.tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3, gamma=0.5), dtype=torch.float64)
    out, sums = reference.predict(h_in, ring.clone(), slots, cf, prev, "rational", False, True, torch.float64)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert out[0, 1, 2].item() == (h_in + ring[2])[0, 1, 2].item()
    assert sums[NONFINITE].item() == 1.0
