"""Predictor "auto": the online choice among rational, linear, damped linear and reuse.

Its pieces are checked separately and then through the runtime: (1) every candidate's
coefficient vector, run by the rational kernel, is that candidate (on every backend, against
float64 predictions computed here from their definitions: the linear variant, d P + (1 - d) R1,
R1), and so is a damped rational or linear config; (2) the device-side choice from one write's
sums holds every candidate's relative error (computed here directly, in float64) and picks the
smallest sum; (3) a run on a fixed schedule computes exactly its plan, reads nothing from the
device during the run, CFG's two branches choose together, and the summary's choices (host) are
the device's.
"""

import math

import pytest
import torch
from helpers import SHAPES, gen, perm_slots, randn, smooth_ring, synthetic_run

from tcpade import coef as K
from tcpade import ops, reference
from tcpade.core import layout as L
from tcpade.core.history import History
from tcpade.policy.choosers import AutoChoice, candidate_errors
from tcpade.policy.config import TCPadeConfig

TIMES = [0.61, 0.74, 0.93]
T_TARGET = 0.45
NAMES = [c.name for c in L.AUTO_CANDIDATES]


def _inputs(shape, device, seed):
    """h_in, a smoothly drifting ring of three residuals and a random slot order (float32)."""
    g = gen(seed)
    h_in = randn(shape, torch.float32, device, g)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    return h_in, ring, perm_slots(3, device, g)


def _f64(h_in, ring, slots, values, variant):
    cf = torch.tensor(values, dtype=torch.float64)
    out, _ = reference.predict(h_in.cpu().double(), ring.cpu().double(), slots.cpu(), cf, None, variant, False, True,
                               torch.float64)  # fmt: skip
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rational_with_zero_pole_bound_is_linear(backend, shape):
    device, _ = backend
    h_in, ring, slots = _inputs(shape, device, 5)
    lin = K.build_coef("linear", "middle", TIMES, T_TARGET, 3, 3)
    rat = K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3)
    assert rat[K.BMAX] > 0  # the rational term is on before the mask
    rat[K.BMAX] = 0.0
    ref64 = _f64(h_in, ring, slots, lin, "linear")
    got, _ = ops.predict(h_in, ring.clone(), slots, K.coef_tensor(rat, device), None, "rational", False, True)
    # fp32 rule of tests/helpers.py: a few roundings per element of operands of the output's scale
    assert (got.cpu().double() - ref64).abs().max().item() <= 1e-5 * (1 + ref64.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("times, target", [(TIMES, T_TARGET), ([5.0, 4.0, 3.0], 8.0), ([3.0, 1.0, 0.0], 9.0)],
                         ids=["sigma", "index-gap3", "index-gap6"])  # fmt: skip
def test_every_candidate_row_is_its_predictor(backend, shape, times, target):
    """Each row of ``candidate_rows`` (what a skip of "auto" runs, on the rational kernel) against
    the float64 prediction of that candidate from its definition. Tolerance: the fp32 rule of
    tests/helpers.py (a few roundings per element of operands of the output's scale)."""
    device, _ = backend
    h_in, ring, slots = _inputs(shape, device, 11)
    rat = K.build_coef("rational", "middle", times, target, 3, 3)
    lin = _f64(h_in, ring, slots, K.build_coef("linear", "middle", times, target, 3, 3), "linear")
    r1 = h_in.cpu().double() + ring.cpu().double()[int(slots[0])]
    tau1 = rat[K.TAU1]
    g_ratio = (target - times[0]) / (times[0] - times[1])  # the gap past R1 in units of the R2 -> R1 spacing
    rows = K.candidate_rows(rat)
    assert len(rows) == len(L.AUTO_CANDIDATES)
    for cand, row in zip(L.AUTO_CANDIDATES, rows):
        if cand.kind == "rational":
            want = _f64(h_in, ring, slots, rat, "rational")
        elif cand.kind == "reuse":
            want = r1
        else:
            d = 1.0 / (1.0 + cand.damping * g_ratio)
            assert math.isclose(K.gap_damping(tau1, cand.damping), d, rel_tol=1e-12)
            want = d * lin + (1.0 - d) * r1
        got, _ = ops.predict(h_in, ring.clone(), slots, K.coef_tensor(row, device), None, "rational", False, True)
        err = (got.cpu().double() - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), (cand.name, err)


@pytest.mark.parametrize("variant", ["rational", "linear"])
@pytest.mark.parametrize("damping", [0.5, 2.0, 8.0])
def test_damped_config_against_float64(backend, variant, damping):
    """``build_coef(..., damping=a)`` (the config field): d P + (1 - d) R1 with d = 1 / (1 + a g),
    P the undamped prediction, on every backend against float64."""
    device, _ = backend
    shape = (2, 9, 40)
    h_in, ring, slots = _inputs(shape, device, 17)
    times, target = [6.0, 3.0, 0.0], 10.0  # a gap of 4 past R1 with R2 3 steps before it: g = 4 / 3
    p = _f64(h_in, ring, slots, K.build_coef(variant, "middle", times, target, 3, 3), variant)
    r1 = h_in.cpu().double() + ring.cpu().double()[int(slots[0])]
    d = 1.0 / (1.0 + damping * 4.0 / 3.0)
    want = d * p + (1.0 - d) * r1
    cf = K.build_coef(variant, "middle", times, target, 3, 3, damping=damping)
    got, _ = ops.predict(h_in, ring.clone(), slots, K.coef_tensor(cf, device), None, variant, False, True)
    assert (got.cpu().double() - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())
    with pytest.raises(ValueError, match="damping"):
        K.build_coef("reuse", "middle", times, target, 3, 3, damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        K.build_coef(variant, "middle", times, target, 3, 3, damping=-1.0)


@pytest.mark.parametrize("variant", ["rational", "linear", "auto"])
def test_one_stored_residual_is_reused(backend, variant):
    """The spaced rule's first skips follow step 0 alone (``MIN_HISTORY`` 1): with one residual
    stored, rational, linear and every "auto" candidate predict h_in + R1 on every backend
    (the other slots hold a stale NaN, as a poisoned earlier run leaves them: it must not be read,
    not even with weight 0, and no non-finite value is reported). Tolerance: h_in + R1 is one fp32
    addition, so the float64 reference of it differs by at most one rounding."""
    device, _ = backend
    shape = (2, 7, 36)
    h_in, ring, slots = _inputs(shape, device, 23)
    for age in (1, 2):
        ring[int(slots[age])] = float("nan")
    assert L.MIN_HISTORY[variant] == 1 and L.MIN_HISTORY["paper"] == 2
    want = h_in.cpu().double() + ring.cpu().double()[int(slots[0])]
    values = K.build_coef(L.kernel_variant(variant), "middle", [4.0, float("nan"), float("nan")], 9.0, 1, 3)
    rows = K.candidate_rows(values) if variant == "auto" else [values]
    for row in rows:
        got, sums = ops.predict(h_in, ring.clone(), slots, K.coef_tensor(row, device), None, L.kernel_variant(variant),
                                False, True)  # fmt: skip
        assert float(sums[L.SUMS.index("nonfinite")]) == 0.0
        assert (got.cpu().double() - want).abs().max().item() <= 2**-23 * want.abs().max().item()


def _history_with(rs, times):
    h = History(nslots=3)
    x = torch.zeros_like(rs[0])
    for r, t in zip(rs, times):
        h.record(x, x + r)
        h.advance(t, True)
    return h, x


@pytest.mark.parametrize("kind", ["rational", "linear", "reuse"])
def test_choice_holds_every_candidates_error(kind):
    """One computed step: the device errors of every candidate equal ||P_c - R||^2 / ||R||^2 computed
    here from each candidate's own prediction, and the index chosen is the smallest."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 6, 16)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    c = (torch.rand(2, 6, 1, generator=g, dtype=torch.float64) - 0.5) * 0.4  # within the pole guard
    times = [1.0, 0.8, 0.55, 0.3]
    h = times[3] - times[2]
    if kind == "rational":  # one pole per row: the rational [1/1] form is exact, linear is not
        traj = [(a + b * ((t - times[3]) / h)) / (1 + c * ((t - times[3]) / h)) for t in times]
    elif kind == "linear":  # linear in t but for a disturbance of the oldest residual, which only rational reads
        traj = [a + b * t + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) * (i == 0)
                for i, t in enumerate(times)]  # fmt: skip
    else:  # the residual comes back to where it was: holding the newest one is best
        traj = [a + b * t for t in times[:3]] + [a + b * times[2] + 0.01 * b]
    traj = [r.float() for r in traj]
    hist, x = _history_with(traj[:3], times[:3])
    values = hist.coef_values("rational", "middle", times[3])
    rows = K.candidate_rows(values)
    preds = [hist.predict(x, K.coef_tensor(r, "cpu"), "rational")[0].double() for r in rows]
    hist.predict(x, K.coef_tensor(values, "cpu"), "rational", write_out=False, probe=True)
    sums = hist.record(x, x + traj[3], probe=True)
    truth = traj[3].double()
    r2 = float((truth * truth).sum())
    direct = [float(((p - truth) ** 2).sum()) / r2 for p in preds]
    auto = AutoChoice()
    chosen = auto.probed(sums, values[K.LAM1], values[K.TAU1])
    assert auto.errors.tolist() == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert int(chosen) == min(range(len(direct)), key=direct.__getitem__)
    want = {"rational": "rational", "linear": "linear", "reuse": "reuse"}[kind]
    assert NAMES[int(chosen)] == want, dict(zip(NAMES, direct))
    v = dict(zip(L.SUMS, sums.tolist()))
    host = candidate_errors(v["d11"], v["d22"], v["d12"], v["err2"], v["r2"], values[K.LAM1], values[K.TAU1])
    assert host == pytest.approx(direct, rel=1e-4, abs=1e-9)


def test_choice_accumulates_and_a_nan_is_never_chosen():
    values = K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3)
    lam1, tau1 = values[K.LAM1], values[K.TAU1]

    def sums(err2, d22, r2=1.0):  # d11 = d12 = 0: every non-rational candidate's error is d22
        s = dict(d11=0.0, d22=d22, d12=0.0, err2=err2, r2=r2, nonfinite=0.0)
        return torch.tensor([s[n] for n in L.SUMS])

    auto = AutoChoice()
    assert auto.index is None  # before any measurement the skips use AUTO_FIRST
    rows = torch.arange(len(L.AUTO_CANDIDATES), dtype=torch.float32)[:, None].expand(-1, L.NCOEF)
    assert int(auto.select(rows)[0]) == L.AUTO_FIRST
    assert NAMES[int(auto.probed(sums(1.0, 3.0), lam1, tau1))] == "rational"
    assert NAMES[int(auto.probed(sums(2.0, 0.5), lam1, tau1))] == "rational"  # 3.0 vs 3.5 summed
    assert NAMES[int(auto.probed(sums(2.0, 0.5), lam1, tau1))] == "linear"  # 5.0 vs 4.0: the first of the ties
    assert int(auto.select(rows)[0]) == NAMES.index("linear")
    fresh = AutoChoice()
    assert NAMES[int(fresh.probed(sums(math.nan, 0.5), lam1, tau1))] != "rational"


@pytest.mark.parametrize("T, sched", [(20, (0, 1, 2, 5, 8, 11, 14, 17)), (13, (0, 1, 4, 7, 10))])
def test_auto_on_a_fixed_schedule(T, sched):
    cfg = TCPadeConfig(predictor="auto", schedule=sched, schedule_steps=T)
    rt, passes, errors, outs = synthetic_run(cfg, T, branches=("cond", "uncond"), shape_seed=4)
    assert passes == {"cond": len(sched), "uncond": len(sched)}
    assert rt.host_reads == 0  # the choice stays on the device during the run
    picks = {}
    for br in ("cond", "uncond"):
        b = rt.branches[br]
        recs = rt.records(br)
        assert [r.k for r in recs if r.computed] == list(sched)
        picks[br] = [(r.k, r.choice) for r in recs if r.choice]
        # every computed step with three residuals stored before it chose
        assert [k for k, _ in picks[br]] == [k for i, k in enumerate(sched) if i >= 3]
        assert {c for _, c in picks[br]} <= set(NAMES)
        assert NAMES[int(b.auto.index)] == picks[br][-1][1]  # host == device
        assert all(math.isfinite(e) for e in errors[br])
        assert all(torch.isfinite(o).all() for o in outs[br])
    # CFG's branches choose together: one AutoChoice (what uncond, which chooses second at each step, records
    # is the choice both use next)
    assert rt.branches["cond"].auto is rt.branches["uncond"].auto


def _two_branch_run(cfg, T, branches):
    """A run of the Runtime whose "smooth" branch's residual is linear in the step index (linear
    extrapolation is exact) and whose "jumpy" branch's residual jumps around a constant (holding the
    newest one is best). Returns the runtime."""
    from tcpade.policy.runtime import Runtime

    g = torch.Generator().manual_seed(8)
    shape = (1, 8, 12)
    a, b, h_in = (torch.randn(shape, generator=g) for _ in range(3))
    jumps = [torch.randn(shape, generator=g) for _ in range(T)]
    traj = {"smooth": [a + b * (k / T) for k in range(T)], "jumpy": [a + 0.3 * jumps[k] for k in range(T)]}
    rt = Runtime(cfg)
    rt.set_steps(T)
    for k in range(T):
        for br in branches:
            call = rt.decide(br, float(T - k))
            if call is not None and call(h_in) is not None:
                rt.finish(br, None, None)
            else:
                rt.finish(br, h_in, h_in + traj[br][k])
    return rt


def test_branches_choose_together_from_their_summed_errors():
    """Two branches whose own errors favour different candidates use one candidate, that of their
    summed errors, not one each."""
    T, sched = 20, (0, 1, 2, 5, 8, 11, 14, 17)
    cfg = TCPadeConfig(predictor="auto", schedule=sched, schedule_steps=T)
    alone = {br: [r.choice for r in _two_branch_run(cfg, T, (br,)).records(br) if r.choice]
             for br in ("smooth", "jumpy")}  # fmt: skip
    assert alone["smooth"][-1] != alone["jumpy"][-1], alone  # (the case: alone they choose differently)
    rt = _two_branch_run(cfg, T, ("smooth", "jumpy"))
    assert rt.branches["smooth"].auto is rt.branches["jumpy"].auto
    # At each step "smooth" chooses first, then "jumpy" adds its errors: what "jumpy" records is the
    # candidate both branches' next skips use, the smallest of the errors of both summed so far.
    recs = {br: [r for r in rt.records(br) if r.choose] for br in ("smooth", "jumpy")}
    total = [0.0] * len(NAMES)
    for a, b in zip(recs["smooth"], recs["jumpy"]):
        assert a.k == b.k
        for r in (a, b):
            v = r.sums.get()
            e = candidate_errors(v.d11, v.d22, v.d12, v.err2, v.r2, r.lam1, r.tau1)
            total = [x + y for x, y in zip(total, e)]
        assert b.choice == NAMES[min(range(len(NAMES)), key=total.__getitem__)], (b.k, dict(zip(NAMES, total)))
    # here the sum follows "jumpy": "smooth" skips with reuse, not with its own choice
    assert recs["jumpy"][-1].choice == alone["jumpy"][-1] != alone["smooth"][-1]


def test_auto_skips_use_damped_linear_until_the_first_choice():
    """Before the first measurement a skip of "auto" predicts as damped linear extrapolation
    (``AUTO_FIRST``); until then its outputs match ``predictor="linear", damping=2`` (another
    kernel: the fp32 rule)."""
    assert NAMES[L.AUTO_FIRST] == "damped-2"
    sched = (0, 1, 3, 6, 9, 12, 15, 18)
    T = 20
    rt_a, _, _, out_a = synthetic_run(TCPadeConfig(predictor="auto", schedule=sched, schedule_steps=T), T)
    lin = TCPadeConfig(predictor="linear", damping=2.0, schedule=sched, schedule_steps=T)
    _, _, _, out_l = synthetic_run(lin, T)
    recs = rt_a.records("default")
    first = next(r.k for r in recs if r.choice)
    assert recs[0].choice == ""  # too little history to choose
    for k in range(first + 1):
        a, b = out_a["default"][k], out_l["default"][k]
        assert (a - b).abs().max().item() <= 1e-5 * (1 + b.abs().max().item()), k


def test_auto_config():
    cfg = TCPadeConfig.budget(passes=7, predictor="auto")
    assert cfg.plan(20) == TCPadeConfig.budget(passes=7).plan(20)
    with pytest.raises(ValueError, match="input_correction"):
        TCPadeConfig(predictor="auto", input_correction=0.2)
    TCPadeConfig(predictor="auto", input_correction=0.0)
    with pytest.raises(ValueError, match="predictor"):
        TCPadeConfig(predictor="automatic")
    with pytest.raises(ValueError, match="damping"):
        TCPadeConfig(predictor="auto", damping=1.0)
    with pytest.raises(ValueError, match="time_axis"):
        TCPadeConfig(time_axis="sigma")
    # the error policy sizes its runs from the chosen candidate's error
    rt, passes, errors, _ = synthetic_run(TCPadeConfig(predictor="auto", policy="error", tolerance=0.1), 20)
    assert 0 < passes["default"] < 20
    rec = [r for r in rt.records("default") if r.choice]
    assert rec and all(math.isfinite(r.error) for r in rec)


def test_damping_with_a_calibrated_reuse_predictor_is_dropped_not_an_error():
    """A rational config with a fixed damping whose calibrations run reuse: the damping does not
    apply to reuse, so the runtime runs plain reuse on the calibrated schedule (no ValueError at
    apply)."""
    from tcpade.policy.plan import Resolved
    from tcpade.policy.runtime import Runtime

    cal = (0, 1, 3, 6, 10, 14, 18)
    cfg = TCPadeConfig.budget(passes=7, damping=1.0, calibrated_predictor=True)
    rt = Runtime(cfg, resolved=Resolved(cfg, predictor="reuse", calibrated=((20, cal),)))
    reuse = TCPadeConfig(predictor="reuse", schedule=cal, schedule_steps=20)
    _, _, _, out_a = synthetic_run(cfg, 20, rt=rt)
    _, _, _, out_b = synthetic_run(reuse, 20)
    assert all(torch.equal(a, b) for a, b in zip(out_a["default"], out_b["default"]))
