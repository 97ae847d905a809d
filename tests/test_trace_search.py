"""tcpade.tools.trace_search: the recorder, the offline error table, the DP and the budgeted search."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from tcpade.core import coef as K
from tcpade.core import reference as ref
from tcpade.policy import schedules as S
from tcpade.tools import trace_search as TS


class FakeTable:
    """A hand-made offline error table: E[(c, a, b)][j] random but fixed per key."""

    def __init__(self, T, seed=0):
        self.T, self.seed, self.calls = T, seed, 0

    def errors(self, c, a, b):
        self.calls += 1
        rng = random.Random(hash((self.seed, c, a, b)))
        out = np.full(self.T, np.inf)
        for j in range(b + 1, self.T):
            out[j] = rng.random() * (j - b) ** 1.5
        return out


def brute_force(table, T, passes, lead):
    """Every schedule of ``passes`` steps starting 0..lead-1, with its summed error."""
    out = []
    for rest in itertools.combinations(range(lead, T), passes - lead):
        sched = tuple(range(lead)) + rest
        hist, total = [TS.NONE] * 3, 0.0
        for i, s in enumerate(sched):
            hist = hist[1:] + [s]
            nxt = sched[i + 1] if i + 1 < len(sched) else T
            total += float(sum(table.errors(*hist)[j] for j in range(s + 1, nxt)))
        out.append((total, sched))
    return sorted(out)


@pytest.mark.parametrize("T,passes,lead,seed", [(8, 4, 2, 0), (9, 5, 2, 1), (8, 3, 1, 2), (10, 4, 2, 3), (7, 2, 2, 4)])
def test_dp_finds_the_brute_force_optimum(T, passes, lead, seed):
    table = FakeTable(T, seed)
    want = brute_force(table, T, passes, lead)
    got = TS.best_schedules(table, T, passes, lead, count=3)
    assert got[0][1] == want[0][1]
    assert got[0][0] == pytest.approx(want[0][0])
    # the best few: distinct schedules, their errors the lowest ones in order
    assert len({s for _, s in got}) == len(got)
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want[: len(got)]])
    assert all(len(s) == passes and S.schedule_problem(s, T, "rational" if lead == 2 else "reuse") is None
               for _, s in got)  # fmt: skip


def test_dp_all_steps_and_bad_passes():
    table = FakeTable(6)
    assert TS.best_schedules(table, 6, 6, 2) == [(0.0, tuple(range(6)))]
    with pytest.raises(ValueError, match="passes must be in \\[2, 6\\]"):
        TS.best_schedules(table, 6, 1, 2)
    with pytest.raises(ValueError, match="passes must be in"):
        TS.best_schedules(table, 6, 7, 2)


@pytest.mark.parametrize("variant", ["rational", "linear", "reuse", "paper"])
@pytest.mark.parametrize("count", [2, 3])
def test_offline_prediction_is_the_reference_one(variant, count):
    g = torch.Generator().manual_seed(5)
    y = [torch.randn(6, 8, generator=g) for _ in range(3)]
    times = [0.55, 0.7, 0.9][:count] + [math.nan] * (3 - count)
    targets = [0.5, 0.4, 0.2]
    cf = torch.tensor([K.build_coef(variant, "middle", times, t, count, 3, gamma=0.0, kappa=0.5 if variant ==
                                    "rational" else 0.0) for t in targets], dtype=torch.float32)  # fmt: skip
    y0 = y[0] if count == 3 else None
    got = TS._predict(variant, (y0, y[1], y[2]), cf)
    for i in range(len(targets)):
        ring = torch.stack([y[2], y[1], y[0] if count == 3 else torch.zeros_like(y[0])])
        want, _ = ref.predict_math(torch.zeros_like(y[2]), ring, [0, 1, 2], cf[i], variant=variant)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def synthetic_trace(T=10, rows=5, C=4, branches=("cond", "uncond"), seed=0):
    g = torch.Generator().manual_seed(seed)
    times = [1.0 - i / T for i in range(T)]
    base = torch.randn(rows, C, generator=g)
    res = {b: [base * (1 + t) ** 2 + 0.05 * torch.randn(rows, C, generator=g) for t in times] for b in branches}
    sc = {b: [torch.ones(rows) for _ in times] for b in branches}
    return TS.Trace(T, times, res, sc, rows)


def test_error_table_matches_the_dp_cost():
    tr = synthetic_trace()
    table = TS.ErrorTable(tr, "rational", weights=[0.1] * 10, guidance=4.0)
    best = TS.best_schedules(table, 10, 5, 2, count=2)
    for v, s in best:
        assert table.cost(s) == pytest.approx(v)
    assert best[0][0] <= table.cost(S.spaced(10, 5, 2))


def test_search_keeps_to_its_budget():
    tr = synthetic_trace(T=12)
    table = TS.ErrorTable(tr, "rational", weights=[1.0] * 12, guidance=3.0)
    calls = []

    def score(sched):
        sched = tuple(sched)
        assert S.schedule_problem(sched, 12, "rational") is None
        calls.append(sched)
        return 40.0 - sum((a - b) ** 2 for a, b in zip(sched, S.spaced(12, len(sched), 2))) * 0.1 + 0.01 * sum(sched)

    log = TS.Log()
    path, curve = TS.search(score, 12, [7, 5, 4], 2, table, 11, log=log)
    assert len(calls) <= 11 and len(log.rows) == len(calls)
    assert sorted(path) == [4, 5, 7] and all(len(path[k]) == k for k in path)
    for k, s in path.items():
        assert S.check_schedule(s, 12, "rational") == s
        measured = [v for kk, _, v, _, _ in log.rows if kk == k]
        assert curve[k] == max(measured) == score(s)
        assert curve[k] >= score(S.spaced(12, k, 2))  # the spaced rule is always measured
    # the first of each count's runs is the spaced rule
    firsts = {}
    for k, s, _, _, why in log.rows:
        firsts.setdefault(k, (s, why))
    assert all(firsts[k] == (S.spaced(12, k, 2), "spaced") for k in path)


def test_weighted_views_share_the_errors_and_the_search_follows_the_concordant_one():
    tr = synthetic_trace(T=12)
    base = TS.ErrorTable(tr, "rational", guidance=3.0)
    late = base.weighted([0.1] * 6 + [1.0] * 6)
    assert late._rows is base._rows
    h = (2, 4, 5)
    np.testing.assert_allclose(late.errors(*h)[6:], base.errors(*h)[6:])
    np.testing.assert_allclose(late.errors(*h)[:6][np.isfinite(base.errors(*h)[:6])],
                               0.01 * base.errors(*h)[:6][np.isfinite(base.errors(*h)[:6])])  # fmt: skip
    # the measured PSNR is minus the late table's offline error: the late table orders every
    # pair right, so the search's moves follow it
    log = TS.Log()
    path, curve = TS.search(lambda s: -late.cost(s), 12, [6], 2, [base, late], 8, log=log)
    assert len(log.rows) == 8
    moves = [why for *_, why in log.rows if why.startswith("move")]
    assert moves and all(why == "move1" for why in moves)
    assert curve[6] == max(v for _, _, v, _, _ in log.rows)
    assert TS._concordance(late, [(6, s, v) for _, s, v, _, _ in log.rows]) > 0


def test_search_rejects_bad_arguments():
    table = TS.ErrorTable(synthetic_trace(T=10), "rational")
    with pytest.raises(ValueError, match="runs must be an int >= the number of pass counts \\(2\\)"):
        TS.search(lambda s: 0.0, 10, [5, 4], 2, table, 1)
    with pytest.raises(ValueError, match="pass counts must be in \\[2, 10\\], got \\[11\\]"):
        TS.search(lambda s: 0.0, 10, [11], 2, table, 5)
    with pytest.raises(ValueError, match="error table is of a 10-step run, steps is 12"):
        TS.search(lambda s: 0.0, 12, [5], 2, table, 5)
    with pytest.raises(ValueError, match="no pass count"):
        TS.search(lambda s: 0.0, 10, [], 2, table, 5)
    with pytest.raises(ValueError, match="weights must be 10 finite numbers"):
        TS.ErrorTable(synthetic_trace(T=10), "rational", weights=[1.0] * 9)
    with pytest.raises(ValueError, match="weights must be 10 finite numbers"):
        table.weighted([1.0] * 9 + [math.nan])
    with pytest.raises(ValueError, match="no error table"):
        TS.search(lambda s: 0.0, 10, [5], 2, [], 5)
    with pytest.raises(ValueError, match="max_gap must be None or an int >= 1"):
        TS.ErrorTable(synthetic_trace(T=10), "rational", max_gap=0)
    with pytest.raises(ValueError, match="predictor must be one of"):
        TS.ErrorTable(synthetic_trace(T=10), "pade")
    with pytest.raises(ValueError, match="max_rows must be None or an int >= 1"):
        TS.Recorder(max_rows=0)
    with pytest.raises(ValueError, match="nothing recorded"):
        TS.Recorder().trace(4)


def test_output_weights_of_euler_flow_are_the_sigma_steps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    w = TS.output_weights(sched, 6)
    sched.set_timesteps(6)
    sig = sched.sigmas.tolist()
    assert w == pytest.approx([abs(sig[j] - sig[j + 1]) for j in range(6)], rel=1e-5)


def test_recorder_and_search_on_a_zoo_model_count_every_run():
    from tcpade import metrics, zoo
    from tcpade.policy.config import TCPadeConfig
    from tcpade.tools.calibrate import _runner

    torch.manual_seed(0)
    model = zoo.load("flux-shapes")
    T, passes, budget = 6, [4, 3], 5
    runner, data_range = _runner(model, [(0, 1)], T, None)
    runs = [0]

    def execute(sched):
        runs[0] += 1
        return runner.run(TCPadeConfig(schedule=tuple(sched), schedule_steps=T)).outputs

    with TS.Recorder(max_rows=7) as rec:
        full = execute(range(T))
    tr = rec.trace(T)
    assert tr.branches == ("cond", "uncond") and tr.rows == 7 and len(tr.times) == T
    assert all(r.shape == (7, 96) for r in tr.residuals["cond"])

    def score(sched):
        return float(metrics.psnr(execute(sched), full, data_range=data_range).mean())

    with pytest.raises(ValueError, match="a budget of 2 runs leaves 1 after the 1 already made, fewer than one per "
                       "pass count \\(2\\); give at least 3"):  # fmt: skip
        TS.search_runner(runner, score, T, passes, 2, "rational", tr, 2, runs[0])
    path, curve = TS.search_runner(runner, score, T, passes, 2, "rational", tr, budget, runs[0])
    assert runs[0] <= budget
    assert {k: len(s) for k, s in path.items()} == {4: 4, 3: 3}
    for k, s in path.items():
        S.check_schedule(s, T, "rational")
        assert curve[k] == pytest.approx(score(s))


@pytest.mark.skipif(not hasattr(__import__("tcpade.policy.config").policy.config.TCPadeConfig(), "time_axis"),
                    reason="this TCPadeConfig has no time_axis")  # fmt: skip
def test_error_table_extrapolates_along_the_configs_time_axis():
    tr = synthetic_trace(T=8)
    assert TS.ErrorTable(tr, "rational", config_overrides={"time_axis": "index"}).axis == [float(j) for j in range(8)]
    assert TS.ErrorTable(tr, "rational", config_overrides={"time_axis": "schedule"}).axis == tr.times


def test_weightings_direct_and_with_the_rest_of_the_run():
    w, rest, flat = TS.weightings([0.5, 0.25, 0.25])
    assert w == [0.5, 0.25, 0.25] and flat == [1.0] * 3
    assert rest == pytest.approx([math.sqrt(0.5 * 1.0), math.sqrt(0.25 * 0.5), 0.25])


@pytest.mark.parametrize("predictor", ["rational", "linear", "reuse"])
@pytest.mark.parametrize("guidance", [None, 4.0])
def test_error_table_from_inner_products_equals_the_direct_predictions(predictor, guidance):
    tr = synthetic_trace(T=9, seed=3)
    g = torch.Generator().manual_seed(4)
    tr.scales = {b: [torch.rand(tr.rows, generator=g) + 0.5 for _ in range(9)] for b in tr.branches}
    kw = dict(weights=[0.2 + 0.1 * j for j in range(9)], guidance=guidance, config_overrides={"kappa": 0.7})
    if predictor != "rational":
        kw["config_overrides"] = {}
    fast = TS.ErrorTable(tr, predictor, **kw)
    slow = TS.ErrorTable(tr, predictor, gram=False, **kw)
    for h in [(TS.NONE, TS.NONE, 0), (TS.NONE, 0, 1), (0, 1, 2), (1, 3, 4), (0, 4, 6), (2, 5, 7)]:
        np.testing.assert_allclose(fast.errors(*h), slow.errors(*h), rtol=2e-4)
