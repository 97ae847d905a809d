"""Property-based tests (hypothesis): every backend against the float64 reference.

Random shapes (odd, small: the Triton interpreter costs ~15 ms a launch), storage dtypes,
ring sizes, variants, stages, time grids (non-uniform, repeated, reversed, near-repeated,
on the sigma or the 0..1000 timestep scale), magnitudes from 1e-8 to 1e4, zeros,
denormals, NaN and +-Inf. Properties:

1. nothing crashes, whatever the values;
2. no non-finite value hides in a result reported as valid: the ``nonfinite`` sum counts
   exactly the non-finite elements a backend stored (and 0 means every written element is
   finite); a predicted h_out is finite wherever h_in + R1 (its fallback) is; every backend
   agrees with the reference on WHETHER something is non-finite;
3. with finite inputs, outputs and sums are within the tolerance below of float64;
4. stale values in ring slots older than the stored history (a NaN left by a poisoned
   earlier run) never reach a prediction;
5. the per-step coefficients built in float64 stay finite once cast to the fp32 tensor
   the kernels read, for every time grid;
6. the Runtime never hands the model a non-finite prediction, and a non-finite value in
   the trajectory makes that step and every later one computed.

Tolerance (the house rule of tests/helpers.py, made scale-free because magnitudes span 12
decades): |got - ref64| <= max(2 * |torch_dtype - ref64|, eps_dtype * max|ref64|), where
torch_dtype is the same math in plain torch at the storage dtype (fp32 arithmetic for
fp32 storage) and eps_dtype is 1e-5 for fp32 (O(10) roundings of 6e-8 each on operands of
a few times the output's scale) and one ulp (2^-8 bf16, 2^-11 fp16) otherwise, floored at
the smallest normal fp32 number times the sum of the coefficients' magnitudes (the
kernels compute in fp32, and a GPU or Triton may flush denormals to zero). The 2x
term is the flash-attention rule: a near-degenerate time grid makes the extrapolation
weights large and the result a cancellation, which no fp32 kernel can beat plain fp32
torch at by more than rounding order.

Examples run per test are counted and printed at the end of the test session (conftest).
"""

import math

import pytest
import torch
from conftest import record_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpade import coef as K
from tcpade import ops, reference
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.runtime import Runtime

# The Triton interpreter reduces in numpy, which warns on the NaN/Inf injected here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
BACKENDS = ops.available_backends("cpu")
F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).tiny  # kernels compute in fp32 and may flush denormals to zero

# Fixed, reproducible profile: derandomize=True makes every run draw the same examples, so
# CI cannot go red on a lucky draw; the counts keep the whole file under ~30 s on 2 cores.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------ strategies


@st.composite
def time_grids(draw):
    """(times of R1, R2, R3 newest first, target time)."""
    kind = draw(st.sampled_from(["decreasing", "increasing", "repeated", "near", "timesteps", "random", "nan"]))
    vals = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4)))
    if kind == "decreasing":  # a sampler's sigmas: R3 oldest (largest), target smallest
        t3, t2, t1, tt = vals[::-1]
    elif kind == "increasing":  # reversed schedule
        t3, t2, t1, tt = vals
    elif kind == "repeated":
        t3, t2, t1, tt = vals[::-1]
        which = draw(st.sampled_from(["t1=t2", "t2=t3", "tt=t1", "all"]))
        if which == "t1=t2":
            t2 = t1
        elif which == "t2=t3":
            t3 = t2
        elif which == "tt=t1":
            tt = t1
        else:
            t3 = t2 = t1 = tt
    elif kind == "near":  # distinct but close: large extrapolation weights
        gap = 10.0 ** draw(st.floats(-12, -3))
        t1 = draw(st.floats(0.1, 0.9))
        t2, t3, tt = t1 + gap, t1 + draw(st.sampled_from([2.0, 1.0 + 1e-3, 3.0])) * gap, t1 - gap
    elif kind == "timesteps":
        t3, t2, t1, tt = (1000.0 * v for v in vals[::-1])
    elif kind == "random":
        t3, t2, t1, tt = draw(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4))
    else:
        t3, t2, t1, tt = vals[::-1]
        t3 = draw(st.sampled_from([math.nan, math.inf]))
    return [t1, t2, t3], tt


SPECIALS = ["zero", "denormal", "nan", "inf", "-inf", "max"]


@st.composite
def cases(draw, op):
    lead = draw(st.sampled_from([(1,), (2,), (2, 1)]))
    shape = (*lead, draw(st.integers(1, 9)), draw(st.integers(1, 70)))
    dtype = draw(st.sampled_from(DTYPES))
    nslot = draw(st.sampled_from([3, 4]))
    case = dict(
        shape=shape,
        dtype=dtype,
        nslot=nslot,
        seed=draw(st.integers(0, 2**31 - 1)),
        h_scale=10.0 ** draw(st.floats(-8, 4)),
        r_scale=10.0 ** draw(st.floats(-8, 4)),
        slot_scales=[10.0 ** draw(st.floats(-2, 2)) for _ in range(nslot)],
        zero_tensor=draw(st.sampled_from([None, None, None, "h_in", "h_out", "ring", "r1"])),
        specials=draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["h_in", "h_out", "ring", "h_prev"]),
                    st.sampled_from(SPECIALS),
                    st.integers(0, 10**6),
                ),
                max_size=3,
            )  # fmt: skip
        ),
        perm=draw(st.permutations(list(range(nslot)))),
        with_prev=draw(st.booleans()),
    )
    if op == "update":
        case["probe"] = draw(st.booleans())
    else:
        case.update(
            variant=draw(st.sampled_from(K.VARIANTS)),
            stage=draw(st.sampled_from(K.STAGES)),
            store=draw(st.booleans()),
            write_out=draw(st.booleans()),
            count=draw(st.integers(1, nslot)),
            grid=draw(time_grids()),
            kappa=draw(st.sampled_from([0.0, 0.0, 1.5])),
            gamma=draw(st.sampled_from([None, 0.0, 0.5])),
            stale_nan=draw(st.booleans()),
        )
        case["count"] = max(case["count"], K.MIN_HISTORY[case["variant"]])
    return case


def _special(kind, dtype):
    fi = torch.finfo(dtype)
    return {"zero": 0.0, "denormal": fi.tiny / 4, "nan": math.nan, "inf": math.inf, "-inf": -math.inf,
            "max": fi.max}[kind]  # fmt: skip


def _build(case):
    """The inputs, as float64 CPU tensors, rounded to the storage dtype once."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype, nslot = case["shape"], case["dtype"], case["nslot"]

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    h_in = rn(shape) * case["h_scale"]
    base = rn(shape) * case["r_scale"]
    drift = rn(shape) * case["r_scale"] * 0.3
    ring = torch.stack([(base + i * drift + 0.05 * case["r_scale"] * rn(shape)) * case["slot_scales"][i]
                        for i in range(nslot)])  # fmt: skip
    t = dict(h_in=h_in, h_out=h_in + base, ring=ring, h_prev=h_in + 0.1 * case["h_scale"] * rn(shape))
    z = case["zero_tensor"]
    if z == "r1":
        t["ring"][case["perm"][0]] = 0.0
    elif z is not None:
        t[z].zero_()
    for name, kind, pos in case["specials"]:
        flat = t[name].view(-1)
        flat[pos % flat.numel()] = _special(kind, dtype)
    return {k: v.to(dtype) for k, v in t.items()}


def _bits(x):
    """Bitwise view, so NaN == NaN in equality checks."""
    return x.contiguous().view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _finite_match(got, ref64, low, dtype, what, floor=2 * F32_TINY):
    """Property 3 on the elements where the float64 reference is finite."""
    fin = torch.isfinite(ref64)
    if not fin.any():
        return
    r = ref64.double()[fin]
    err = (got.double()[fin] - r).abs().max().item()
    err_low = (low.double()[fin] - r).abs().nan_to_num(math.inf).max().item()
    tol = max(2.0 * err_low, REL[dtype] * r.abs().max().item(), floor)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} (plain torch {err_low:.3g})"


def _near_overflow(x64, dtype):
    """A float64 value within 1% of the dtype's largest: rounding may go either way."""
    fin = x64[torch.isfinite(x64)]
    return fin.numel() > 0 and fin.abs().max().item() > 0.99 * torch.finfo(dtype).max


# -------------------------------------------------------------------------------- update


@settings(FUZZ, max_examples=150)
@given(case=cases("update"))
def test_update_fuzz(case):
    record_examples("update")
    x = _build(case)
    dtype, nslot = case["dtype"], case["nslot"]
    slots = torch.tensor(case["perm"], dtype=torch.int32)
    prev = x["h_prev"] if case["with_prev"] else None

    def run_ref(cd):
        ring = x["ring"].clone()
        p = prev.clone() if prev is not None else None
        sums = reference.update(x["h_in"], x["h_out"], ring, slots, p, case["probe"], cd)
        return ring, sums

    ring64, sums64 = run_ref(torch.float64)
    ring_low, _ = run_ref(dtype)
    sums32 = run_ref(torch.float32)[1].tolist()
    inputs_finite = all(torch.isfinite(t).all() for t in (x["h_in"], x["h_out"], x["ring"]))
    w = case["perm"][-1]  # the write slot
    for name in BACKENDS:
        ring = x["ring"].clone()
        p = prev.clone() if prev is not None else None
        with ops.use_backend(name):
            sums = ops.update(x["h_in"], x["h_out"], ring, slots, p, case["probe"])
        s = [float(v) for v in sums]
        # Property 2: exactly the non-finite stored elements are counted; nothing else changed.
        assert s[5] == float((~torch.isfinite(ring[w])).sum()), (name, s)
        assert (s[5] > 0) == (float(sums64[5]) > 0) or _near_overflow(
            x["h_out"].double() - x["h_in"].double(), dtype
        ), (name, s, sums64.tolist())
        others = [i for i in range(nslot) if i != w]
        assert torch.equal(_bits(ring[others]), _bits(x["ring"][others])), name
        if p is not None:
            assert torch.equal(_bits(p), _bits(x["h_in"])), "h_prev must hold h_in exactly"
        # Property 3.
        _finite_match(ring[w], ring64[w], ring_low[w], dtype, f"{name} ring")
        if inputs_finite and s[5] == 0:
            p2 = float((x["ring"][w].double() ** 2).sum()) if case["probe"] else 0.0
            _check_sums(s, sums64.tolist(), sums32, (0, 1, 2, 3, 4), name, p2)


def _check_sums(s, s64, s32, idx, name, p2=0.0):
    """The sums against float64: within 1e-4 relative (fp32 accumulation of <= 1260
    non-negative terms errs by <= n * 6e-8; sums[2] = sum d1*d2 may cancel, so its scale
    is sqrt(sums[0] * sums[1]) by Cauchy-Schwarz), or within 2x the error of the same sums
    in plain fp32 torch (s32): d2 = R_new - R1 is a cancellation when the new residual is
    close to the last one, and its fp32 rounding is no backend's to remove. p2: ||P||^2 of
    a probe P, the scale of err2 = ||P - R||^2 next to ||R||^2 (P - R may cancel)."""
    for i in idx:
        if abs(s64[i]) > 0.5 * F32_MAX or not math.isfinite(s[i]):
            # Squares of values near the fp32 range overflow the fp32 sums: they must then
            # read inf/NaN (which the policy treats as non-finite), never a finite number.
            assert abs(s64[i]) <= F32_MAX or not math.isfinite(s[i]), (name, i, s, s64)
            assert math.isfinite(s[i]) or max(abs(s64[j]) for j in idx) > 0.5 * F32_MAX, (name, i, s, s64)
            continue
        scale = abs(s64[i]) if i != 2 else math.sqrt(max(s64[0], 0.0) * max(s64[1], 0.0))
        if i == 3:
            scale = max(scale, s64[4], p2)  # P - R may cancel too
        tol = max(1e-4 * scale, 2.0 * abs(s32[i] - s64[i])) + 1e-37
        assert abs(s[i] - s64[i]) <= tol, (name, i, s, s64, s32)


# ------------------------------------------------------------------------------- predict


@settings(FUZZ, max_examples=300)
@given(case=cases("predict"))
def test_predict_fuzz(case):
    record_examples("predict")
    x = _build(case)
    dtype, nslot, variant = case["dtype"], case["nslot"], case["variant"]
    times, t_target = case["grid"]
    kw = dict(kappa=case["kappa"], gamma=case["gamma"])
    cf = K.build_coef(variant, case["stage"], times, t_target, case["count"], nslot, **kw)
    coef = K.coef_tensor(cf, "cpu")
    assert torch.isfinite(coef).all(), (times, t_target, cf)  # property 5
    slots = torch.tensor(case["perm"], dtype=torch.int32)
    prev = x["h_prev"] if case["with_prev"] else None
    store, write_out = case["store"], case["write_out"]
    ring0 = x["ring"]
    if case["stale_nan"]:
        # Slots older than the stored history hold garbage (NaN from a poisoned earlier
        # run, kept by History.reset): it must not matter (property 4).
        ring0 = ring0.clone()
        for age in range(case["count"], nslot):
            ring0[case["perm"][age]] = math.nan

    def call(backend, ring_in, cd=None):
        ring = ring_in.clone()
        p = prev.clone() if prev is not None else None
        if cd is None:
            with ops.use_backend(backend):
                out, sums = ops.predict(x["h_in"], ring, slots, coef, p, variant, store, write_out)
        else:
            c = torch.tensor(cf, dtype=cd) if cd == torch.float64 else coef
            out, sums = reference.predict(x["h_in"], ring, slots, c, p, variant, store, write_out, cd)
        return out, sums, ring, p

    clean = x["ring"].clone()
    for age in range(case["count"], nslot):
        clean[case["perm"][age]] = 0.0
    out64, sums64, ring64, _ = call(None, clean, torch.float64)
    out_low, _, ring_low, _ = call(None, clean, dtype)
    sums32 = call(None, clean, torch.float32)[1].tolist()
    w = case["perm"][-1]
    # Flushing each denormal input to zero moves the result by at most tiny * sum|weights|.
    ftz = F32_TINY * (2.0 + sum(abs(c) for c in cf))
    read = [case["perm"][a] for a in range(case["count"])]
    inputs_finite = all(torch.isfinite(t).all() for t in (x["h_in"], ring0[read])) and (
        prev is None or torch.isfinite(prev).all()
    )
    near = _near_overflow(out64.double(), dtype) or _near_overflow(ring64[w].double(), dtype)
    # The kernels accumulate the squared norms and TSI sums in fp32: where the float64 sums exceed
    # fp32's range, the kernels' overflow to inf, and the data-dependent terms computed from them
    # (the rational / paper pole term) may differ from the reference by more than rounding, also
    # where the prediction itself is not written (it is still counted) or is far from overflow.
    sums_overflow = any(math.isfinite(v) and abs(v) > F32_MAX for v in sums64.tolist())
    near = near or sums_overflow
    for name in BACKENDS:
        out, sums, ring, p = call(name, ring0)
        s = [float(v) for v in sums]
        assert out.shape == (x["h_in"].shape if write_out else (0,)), name
        # Property 2: the count covers every non-finite element stored or predicted; a
        # non-finite h_out element was replaced by h_in + R1, so h_out can be non-finite
        # only where that is too (the count keeps the raw prediction's).
        bad_out = (~torch.isfinite(out)).reshape(-1)
        if write_out:
            r1 = ring0[case["perm"][0]]
            fallback = (x["h_in"].float() + r1.float()).to(dtype).reshape(-1)
            assert not (bad_out & torch.isfinite(fallback)).any(), f"{name}: non-finite h_out with a finite fallback"
        if store:
            bad = ~torch.isfinite(ring[w]).reshape(-1)
            assert s[5] >= float((bad | bad_out).sum()) if write_out else s[5] == float(bad.sum()), (name, s)
        else:
            assert s[5] >= float(bad_out.sum()), (name, s)
            assert torch.equal(_bits(ring), _bits(ring0)), f"{name}: ring changed without store"
        if s[5] == 0:
            assert not bad_out.any() and torch.isfinite(ring[w] if store else out.new_zeros(1)).all()
        if not near:
            assert (s[5] > 0) == (float(sums64[5]) > 0), (name, s, sums64.tolist())
        if p is not None:
            assert torch.equal(_bits(p), _bits(x["h_in"])), "h_prev must hold h_in exactly"
        # Properties 3 and 4: stale slots are zero in the reference run, NaN here.
        if write_out and not sums_overflow:
            _finite_match(out, out64, out_low, dtype, f"{name} {variant}/{case['stage']} out", ftz)
        if store:
            _finite_match(ring[w], ring64[w], ring_low[w], dtype, f"{name} {variant} stored", ftz)
        if inputs_finite and s[5] == 0 and float(sums64[5]) == 0:
            # The TSI sums read R2: only meaningful (and only read by the policy) with it stored.
            tsi = (0, 1, 2) if store and case["count"] >= 2 else ()
            _check_sums(s, sums64.tolist(), sums32, (*tsi, 4), name)


# ---------------------------------------------------------------------------- coefficients


@settings(FUZZ, max_examples=500)
@given(
    grid=time_grids(),
    variant=st.sampled_from(K.VARIANTS),
    stage=st.sampled_from(K.STAGES),
    count=st.integers(0, 4),
    nslot=st.sampled_from([3, 4]),
    delta=st.floats(0.01, 0.99),
)
def test_coef_finite_for_any_time_grid(grid, variant, stage, count, nslot, delta):
    record_examples("coef")
    times, t_target = grid
    cf = K.build_coef(variant, stage, times, t_target, count, nslot, delta=delta)
    assert len(cf) == K.NCOEF
    assert torch.isfinite(K.coef_tensor(cf, "cpu")).all(), (times, t_target, cf)
    assert cf[K.BMAX] >= 0.0


# ------------------------------------------------------------------------------- runtime


@st.composite
def runs(draw):
    cfg = TCPadeConfig(
        predictor=draw(st.sampled_from(K.VARIANTS)),
        policy=draw(st.sampled_from(["tsi", "error"])),
        warmup=draw(st.integers(0, 3)),
        interval=draw(st.integers(0, 5)),
        max_skips=draw(st.integers(0, 4)),
        tolerance=draw(st.sampled_from([0.05, 0.5, 10.0])),
        store_predictions=draw(st.booleans()),
    )
    T = draw(st.integers(1, 14))
    bad_at = draw(st.none() | st.integers(0, 13))
    bad_kind = draw(st.sampled_from(["nan_out", "inf_out", "nan_in", "fp16_overflow"]))
    reversed_time = draw(st.booleans())
    return cfg, T, bad_at, bad_kind, reversed_time, draw(st.integers(0, 2**31 - 1))


@settings(FUZZ, max_examples=100)
@given(run=runs())
def test_runtime_never_returns_nonfinite(run):
    """Property 6, through the Runtime with random configs and a fault at a random step."""
    record_examples("runtime")
    cfg, T, bad_at, bad_kind, reversed_time, seed = run
    dtype = torch.float16 if bad_kind == "fp16_overflow" else torch.float32
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, 6, 10, generator=g), torch.randn(1, 6, 10, generator=g)
    rt = Runtime(cfg)
    rt.set_steps(T)
    for k in range(T):
        s = (k + 1) / T if reversed_time else 1.0 - k / T
        h_in = (a * s).to(dtype)
        fault = bad_at == k
        if fault and bad_kind == "nan_in":
            h_in[0, 0, 0] = math.nan
        predict = rt.decide("default", s)
        pred = predict(h_in) if predict is not None else None
        if pred is None:
            h_out = (h_in.float() + b * (1 + s)).to(dtype)
            if fault and bad_kind in ("nan_out", "inf_out"):
                h_out[0, 1, 2] = math.nan if bad_kind == "nan_out" else math.inf
            if fault and bad_kind == "fp16_overflow":  # both finite, the residual is not
                h_in[0, 2, 3], h_out[0, 2, 3] = -40000.0, 40000.0
            rt.finish("default", h_in, h_out)
        else:
            rt.finish("default", None, None)
            # Finite wherever h_in is (a NaN input element is the model's, not tcpade's).
            assert torch.isfinite(pred[torch.isfinite(h_in)]).all(), (k, cfg)
            assert pred.shape == h_in.shape and pred.dtype == dtype
    recs = rt.records("default")
    if reversed_time:
        # Increasing times: Run.restarted() assumes a decreasing schedule until a
        # branch has two records, so step 1 is taken for a new run and every step is
        # computed (safe, no skip). Reported; only the safety properties are checked.
        return
    assert [r.k for r in recs] == list(range(T))
    first = next((r.k for r in recs if r.nonfinite), None)
    if first is not None and cfg.plan(T) is None:  # (a fixed schedule keeps its plan and reports)
        assert all(r.computed for r in recs[first:]), [(r.k, r.computed, r.reason) for r in recs]
    if bad_at is not None and bad_at < T and (recs[bad_at].computed or bad_kind == "nan_in"):
        # The fault is seen at its own step: in the computed residual, or (a NaN input on a
        # skipped step) in the prediction's fallback count.
        assert first == bad_at, [(r.k, r.computed, r.nonfinite) for r in recs]
