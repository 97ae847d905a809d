"""Predictor "auto": the online choice between rational and linear, per branch.

Its two pieces are checked separately and then through the runtime: (1) the rational kernel with
its pole bound zeroed is the linear extrapolation (on every backend, against the float64 linear
variant); (2) the device-side choice from one write's sums picks the candidate that erred less
(their errors computed here directly, in float64); (3) a run on a fixed schedule computes exactly
its plan, reads nothing from the device during the run, and the summary's choices (host) are the
device's.
"""

import math

import pytest
import torch
from helpers import SHAPES, gen, perm_slots, randn, smooth_ring, synthetic_run

from tcpade import coef as K
from tcpade import ops, reference
from tcpade.core import layout as L
from tcpade.core.history import History
from tcpade.policy.choosers import choice_mask
from tcpade.policy.config import TCPadeConfig

TIMES = [0.61, 0.74, 0.93]
T_TARGET = 0.45


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rational_with_zero_pole_bound_is_linear(backend, shape):
    device, _ = backend
    g = gen(5)
    h_in = randn(shape, torch.float32, device, g)
    ring = smooth_ring(shape, 3, torch.float32, device, g)
    slots = perm_slots(3, device, g)
    lin = K.build_coef("linear", "middle", TIMES, T_TARGET, 3, 3)
    rat = K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3)
    assert rat[K.BMAX] > 0  # the rational term is on before the mask
    rat[K.BMAX] = 0.0
    ref64, _ = reference.predict(h_in.cpu().double(), ring.cpu().double(), slots.cpu(),
                                 torch.tensor(lin, dtype=torch.float64), None, "linear", False, True, torch.float64)  # fmt: skip
    got, _ = ops.predict(h_in, ring.clone(), slots, K.coef_tensor(rat, device), None, "rational", False, True)
    # fp32 rule of tests/helpers.py: a few roundings per element of operands of the output's scale
    assert (got.cpu().double() - ref64).abs().max().item() <= 1e-5 * (1 + ref64.abs().max().item())


def _history_with(rs, times):
    h = History(nslots=3)
    x = torch.zeros_like(rs[0])
    for r, t in zip(rs, times):
        h.record(x, x + r)
        h.advance(t, True)
    return h, x


@pytest.mark.parametrize("kind", ["rational", "linear"])
def test_choice_picks_the_candidate_with_the_smaller_error(kind):
    g = torch.Generator().manual_seed(3)
    shape = (2, 6, 16)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    c = (torch.rand(2, 6, 1, generator=g, dtype=torch.float64) - 0.5) * 0.4  # within the pole guard
    times = [1.0, 0.8, 0.55, 0.3]
    h = times[3] - times[2]
    if kind == "rational":  # one pole per row: the rational [1/1] form is exact, linear is not
        traj = [(a + b * ((t - times[3]) / h)) / (1 + c * ((t - times[3]) / h)) for t in times]
    else:  # linear in t but for a disturbance of the oldest residual, which only the rational fit reads
        traj = [a + b * t + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) * (i == 0)
                for i, t in enumerate(times)]  # fmt: skip
    traj = [r.float() for r in traj]
    h, x = _history_with(traj[:3], times[:3])
    cf = h.coef_values("rational", "middle", times[3])
    coef = K.coef_tensor(cf, "cpu")
    p_rat, _ = h.predict(x, coef, "rational")  # the probe's prediction, read out (nothing stored)
    cl = h.coef_values("linear", "middle", times[3])
    p_lin, _ = h.predict(x, K.coef_tensor(cl, "cpu"), "linear")
    h.predict(x, coef, "rational", write_out=False, probe=True)  # (writes into R3's slot, the write slot)
    sums = h.record(x, x + traj[3], probe=True)
    e_rat = float(((p_rat.double() - traj[3].double()) ** 2).sum())
    e_lin = float(((p_lin.double() - traj[3].double()) ** 2).sum())
    assert (e_rat < e_lin) == (kind == "rational"), (e_rat, e_lin)
    v = dict(zip(L.SUMS, sums.tolist()))
    assert math.isclose(v["err2"], e_rat, rel_tol=1e-4)
    mask, acc = choice_mask(sums, coef, None)
    r2 = v["r2"]
    assert acc.tolist() == pytest.approx([e_rat / r2, e_lin / r2], rel=1e-4)
    assert float(mask[K.BMAX]) == (1.0 if kind == "rational" else 0.0)
    assert all(float(m) == 1.0 for i, m in enumerate(mask) if i != K.BMAX)


def test_choice_accumulates_and_a_nan_keeps_rational():
    coef = K.coef_tensor(K.build_coef("rational", "middle", TIMES, T_TARGET, 3, 3), "cpu")
    lam1 = float(coef[K.LAM1])

    def sums(err2, lin2, r2=1.0):  # d11 = 1, d12 = 0: lin2 = d22 + lam1^2
        s = dict(d11=1.0, d22=lin2 - lam1 * lam1, d12=0.0, err2=err2, r2=r2, nonfinite=0.0)
        return torch.tensor([s[n] for n in L.SUMS])

    m, acc = choice_mask(sums(1.0, 3.0), coef, None)
    assert float(m[K.BMAX]) == 1.0
    m, acc = choice_mask(sums(2.0, 0.5), coef, acc)  # 3.0 vs 3.5 accumulated: still rational
    assert float(m[K.BMAX]) == 1.0
    m, acc = choice_mask(sums(2.0, 0.5), coef, acc)  # 5.0 vs 4.0: linear
    assert float(m[K.BMAX]) == 0.0
    m, _ = choice_mask(sums(math.nan, 0.5), coef, None)
    assert float(m[K.BMAX]) == 1.0


@pytest.mark.parametrize("T, sched", [(20, (0, 1, 2, 5, 8, 11, 14, 17)), (13, (0, 1, 4, 7, 10))])
def test_auto_on_a_fixed_schedule(T, sched):
    cfg = TCPadeConfig(predictor="auto", schedule=sched, schedule_steps=T)
    rt, passes, errors, outs = synthetic_run(cfg, T, branches=("cond", "uncond"))
    assert passes == {"cond": len(sched), "uncond": len(sched)}
    assert rt.host_reads == 0  # the choice stays on the device during the run
    for br in ("cond", "uncond"):
        b = rt.branches[br]
        recs = rt.records(br)
        assert [r.k for r in recs if r.computed] == list(sched)
        picks = [(r.k, r.choice) for r in recs if r.choice]
        # every computed step with three residuals stored before it chose
        assert [k for k, _ in picks] == [k for i, k in enumerate(sched) if i >= 3]
        assert {c for _, c in picks} <= {"rational", "linear"}
        assert float(b.auto.mask[K.BMAX]) == (1.0 if picks[-1][1] == "rational" else 0.0)  # host == device
        assert all(math.isfinite(e) for e in errors[br])
        assert all(torch.isfinite(o).all() for o in outs[br])


def test_auto_matches_rational_until_it_first_chooses_linear():
    sched = (0, 1, 2, 5, 8, 11, 14, 17)
    T = 20
    rt_a, _, _, out_a = synthetic_run(TCPadeConfig(predictor="auto", schedule=sched, schedule_steps=T), T)
    _, _, _, out_r = synthetic_run(TCPadeConfig(predictor="rational", schedule=sched, schedule_steps=T), T)
    recs = rt_a.records("default")
    first_linear = next((r.k for r in recs if r.choice == "linear"), T)
    for k in range(T):
        if k <= first_linear:
            assert torch.equal(out_a["default"][k], out_r["default"][k]), k
    assert recs[0].choice == ""  # too little history to choose


def test_auto_config():
    cfg = TCPadeConfig.budget(passes=7, predictor="auto")
    assert cfg.plan(20) == TCPadeConfig.budget(passes=7).plan(20)
    with pytest.raises(ValueError, match="input_correction"):
        TCPadeConfig(predictor="auto", input_correction=0.2)
    TCPadeConfig(predictor="auto", input_correction=0.0)
    with pytest.raises(ValueError, match="predictor"):
        TCPadeConfig(predictor="automatic")
    # the error policy sizes its runs from the chosen candidate's error
    rt, passes, errors, _ = synthetic_run(TCPadeConfig(predictor="auto", policy="error", tolerance=0.1), 20)
    assert 0 < passes["default"] < 20
    rec = [r for r in rt.records("default") if r.choice]
    assert rec and all(math.isfinite(r.error) for r in rec)
