"""Fixed schedules and compute budgets: validation, exact pass counts, the registry.

The runtime is driven by the synthetic block stack of test_policy (an exact, cheap residual),
so the computed steps can be counted directly; the registry and the summary run on a tiny
random FLUX transformer through tcpade.sample.
"""

import math

import pytest
import torch
from helpers import flow_sigmas, rule_fast, rule_slow

import tcpade
from tcpade import schedules
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.runtime import Runtime

SHAPE = (1, 8, 16)


def _computed(cfg, T, branches=("cond", "uncond"), nan_at=None, rt=None):
    """The computed steps per branch of one T-step run of the synthetic stack."""
    rt = rt or Runtime(cfg)
    rt.set_steps(T)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    done = {br: [] for br in branches}
    for k, s in enumerate(flow_sigmas(T)):
        for i, br in enumerate(branches):
            h_in = torch.full(SHAPE, float(s)) + i
            predict = rt.decide(br, float(s))
            pred = predict(h_in) if predict is not None else None
            if pred is None:
                h_out = h_in + a + b * s
                if nan_at == k:
                    h_out = h_out.clone()
                    h_out[0, 0, 0] = math.nan
                rt.finish(br, h_in, h_out)
                done[br].append(k)
            else:
                assert torch.isfinite(pred).all()
                rt.finish(br, None, None)
    return done


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(schedule=(0, 1, 5), schedule_steps=None), "schedule_steps"),
        (dict(schedule=(0, 1, 5), schedule_steps=0), "schedule_steps"),
        (dict(schedule_steps=20), "schedule_steps"),
        (dict(schedule=(0, 1, 5, 5), schedule_steps=20), "strictly increasing"),
        (dict(schedule=(0, 5, 1), schedule_steps=20), "strictly increasing"),
        (dict(schedule=(0, 1, 20), schedule_steps=20), r"in \[0, 19\]"),
        (dict(schedule=(-1, 0, 1), schedule_steps=20), r"in \[0, 19\]"),
        (dict(schedule=(0, 1, 2.0), schedule_steps=20), "ints"),
        (dict(schedule=(0, True), schedule_steps=20), "ints"),
        (dict(schedule=(), schedule_steps=20), "non-empty"),
        (dict(schedule="0,1", schedule_steps=20), "sequence"),
        (dict(schedule=(1, 2, 3), schedule_steps=20), "step 0"),
        (dict(predictor="paper", schedule=(0, 2, 3), schedule_steps=20), "steps 0..1.*paper"),
        (dict(schedule=(0, 1), schedule_steps=20, passes=4), "at most one"),
        (dict(passes=4, speedup=2.0), "at most one"),
        (dict(passes=0), "passes"),
        (dict(predictor="paper", passes=1), "passes"),
        (dict(passes=3.0), "passes"),
        (dict(speedup=0.5), "speedup"),
        (dict(speedup=math.nan), "speedup"),
        (dict(speedup=True), "speedup"),
        (dict(passes=4, use_calibrated=1), "use_calibrated"),
        (dict(passes=4, budget_max_run=0), "budget_max_run"),
        (dict(passes=4, budget_max_run=2.0), "budget_max_run"),
    ],
)
def test_bad_schedule_fields_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match) as exc:
        TCPadeConfig(**kw)
    assert "TCPadeConfig." in str(exc.value)


def test_schedule_is_stored_as_a_tuple_and_reuse_may_skip_step_1():
    cfg = TCPadeConfig(schedule=[0, 1, 4], schedule_steps=6)
    assert cfg.schedule == (0, 1, 4) and hash(cfg) == hash(TCPadeConfig(schedule=(0, 1, 4), schedule_steps=6))
    # reuse needs one stored residual, so only step 0 is required
    assert TCPadeConfig(predictor="reuse", schedule=(0, 3), schedule_steps=6).plan(6) == (0, 3)
    with pytest.raises(ValueError, match="step 0"):
        TCPadeConfig(predictor="reuse", schedule=(1, 3), schedule_steps=6)


def test_budget_needs_exactly_one_argument():
    for kw in ({}, dict(passes=4, speedup=2.0)):
        with pytest.raises(ValueError, match="exactly one"):
            TCPadeConfig.budget(**kw)


def test_schedule_for_another_T_is_refused_and_rescaled_on_request():
    cfg = TCPadeConfig(schedule=(0, 1, 4, 7, 9, 14, 18), schedule_steps=20)
    with pytest.raises(ValueError, match="schedule_steps=20.*50"):
        cfg.plan(50)
    for T in (10, 28, 50, 7):
        r = cfg.rescaled(T)
        assert len(r.plan(T)) == 7 and r.plan(T)[0] == 0 and r.schedule_steps == T
    assert cfg.rescaled(20) == cfg
    # step 0 kept (the one residual every predictor but the paper's needs), the rest at their fraction
    assert cfg.rescaled(50).schedule == (0, 3, 10, 18, 23, 36, 46)
    with pytest.raises(ValueError, match="rescaled to 6"):
        cfg.rescaled(6)
    with pytest.raises(ValueError, match="needs a schedule"):
        TCPadeConfig.fast().rescaled(20)


def test_policy_configs_have_no_plan():
    for cfg in (TCPadeConfig(), TCPadeConfig.adaptive(), rule_slow(tsi_threshold=0.5)):
        assert cfg.plan(20) is None and cfg.plan_source(20) == "policy"
    # A TSI that never blocks: the rule's steps are known before the run.
    assert rule_fast().plan(20) == (0, 1, 2, 4, 8, 12, 16) and rule_fast().plan_source(20) == "fixed rule"
    # the slow and fast presets are budgets: the spaced rule without a calibrated schedule
    assert TCPadeConfig.fast().plan(20) == schedules.spaced(20, 7) == (0, 3, 6, 9, 12, 15, 18)
    assert TCPadeConfig.slow().plan(20) == schedules.spaced(20, 8) == (0, 3, 5, 8, 10, 13, 15, 18)
    assert TCPadeConfig.fast().plan_source(20) == TCPadeConfig.slow().plan_source(20) == "spaced rule"
    assert [len(TCPadeConfig.slow().plan(T)) for T in (10, 20, 28, 50)] == [4, 8, 11, 20]
    assert [len(TCPadeConfig.fast().plan(T)) for T in (10, 20, 28, 50)] == [3, 7, 9, 17]
    # the presets' guard for short runs: at most 3 steps predicted in a row by the spaced rule
    for T in range(2, 60):
        for cfg in (TCPadeConfig.slow(), TCPadeConfig.fast()):
            assert schedules.longest_skip_run(cfg.plan(T), T) <= 3, (T, cfg.plan(T))
    assert TCPadeConfig.budget(passes=2).plan(10) == (0, 8)  # a budget without the guard is exact
    # the guard raises a count that comes from the speedup (2 of 10 at 4.5x: 3, not 2) ...
    assert TCPadeConfig.budget(speedup=4.5).plan(10) == (0, 8)
    assert TCPadeConfig.budget(speedup=4.5, budget_max_run=3).plan(10) == (0, 4, 8)
    # ... and keeps an explicit one
    assert TCPadeConfig.budget(passes=2, budget_max_run=3).plan(10) == (0, 8)
    # the paper's predictor needs two residuals: steps 0 and 1 first
    assert TCPadeConfig.budget(passes=3, predictor="paper", store_predictions=True).plan(10) == (0, 1, 8)


# ------------------------------------------------------------------------------ pass counts
def test_spaced_rule():
    assert schedules.spaced(20, 8) == (0, 3, 5, 8, 10, 13, 15, 18)
    assert schedules.spaced(20, 7) == (0, 3, 6, 9, 12, 15, 18)
    assert schedules.spaced(10, 4) == (0, 3, 5, 8) and schedules.spaced(10, 3) == (0, 4, 8)
    assert schedules.spaced(20, 20) == tuple(range(20))
    assert schedules.spaced(20, 2) == (0, 18)
    assert schedules.spaced(20, 8, lead=2) == (0, 1, 3, 6, 9, 12, 15, 18)  # the paper's predictor: two first
    assert schedules.spaced(20, 2, lead=2) == (0, 1)
    assert schedules.spaced(5, 4) == (0, 1, 2, 3)


@pytest.mark.parametrize("T", [10, 20, 28, 50, 7, 13, 33])
def test_budget_passes_are_exact_at_any_T(T):
    for k in range(1, T + 1):
        plan = TCPadeConfig.budget(passes=k).plan(T)
        assert len(plan) == k and plan[0] == 0 and list(plan) == sorted(set(plan)) and plan[-1] < T
    for s in (1.0, 2.0, 2.5, 20 / 7, 10 / 3, 4.0, 100.0):
        plan = TCPadeConfig.budget(speedup=s).plan(T)
        assert len(plan) == min(T, max(1, math.floor(T / s + 0.5)))
    assert len(TCPadeConfig.budget(passes=T + 5).plan(T)) == T  # more passes than steps: all of them


@pytest.mark.parametrize("predictor", ["rational", "linear", "paper", "reuse"])
@pytest.mark.parametrize("T, k", [(10, 4), (20, 8), (28, 9), (50, 17), (13, 5)])
def test_runtime_computes_exactly_the_plan_in_every_branch(predictor, T, k):
    cfg = TCPadeConfig.budget(passes=k, predictor=predictor, store_predictions=predictor == "paper")
    done = _computed(cfg, T)
    assert done["cond"] == done["uncond"] == list(cfg.plan(T))


def test_schedule_overrides_the_policy_fields_and_max_skips():
    sched = (0, 1, 10, 19)  # runs of 8 skips with max_skips=3
    for policy in ("tsi", "error"):
        cfg = TCPadeConfig(policy=policy, max_skips=3, warmup=6, final_steps=3, schedule=sched, schedule_steps=20)
        assert _computed(cfg, 20) == {"cond": list(sched), "uncond": list(sched)}


def test_non_finite_values_keep_the_schedule_and_are_reported():
    # A fixed schedule reads nothing from the device to decide: the NaN in step 1's h_out
    # changes no decision, every prediction is finite (the device-side fallback) and the
    # records report the step.
    cfg = TCPadeConfig(schedule=(0, 1, 5), schedule_steps=10)
    rt = Runtime(cfg)
    done = _computed(cfg, 10, branches=("cond",), nan_at=1, rt=rt)
    assert done["cond"] == [0, 1, 5]
    assert rt.host_reads == 0
    assert [r.k for r in rt.records("cond") if r.computed and r.nonfinite] == [1]


# -------------------------------------------------------------------------------- registry
def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()  # fmt: skip


def _sample(tr, T, cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    cond = dict(encoder_hidden_states=torch.randn(1, 3, 8, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), img_ids=torch.zeros(6, 3),
                txt_ids=torch.zeros(3, 3))  # fmt: skip
    return tcpade.sample(tr, FlowMatchEulerDiscreteScheduler(), torch.randn(1, 6, 4, generator=g), cond=cond,
                         steps=T, config=cfg, return_summary=True, progress=False, timestep_scale=1e-3)  # fmt: skip


@pytest.fixture
def registry():
    schedules.clear(shipped=False)
    yield
    schedules.clear()


def test_model_key_is_class_and_config(registry):
    a, b = _tiny_flux(), _tiny_flux()
    assert schedules.model_key(a) == schedules.model_key(b)
    assert schedules.model_key(a).startswith("FluxTransformer2DModel:")
    from diffusers import FluxTransformer2DModel

    other = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4))  # fmt: skip
    assert schedules.model_key(other) != schedules.model_key(a)


def test_budget_uses_a_registered_schedule_and_says_so(registry):
    tr = _tiny_flux()
    cal = (0, 1, 2, 6)
    schedules.register(schedules.model_key(tr), "rational", 8, {4: cal})
    _, summ = _sample(tr, 8, TCPadeConfig.budget(passes=4))
    assert summ.computed("cond") == list(cal)
    assert "schedule: calibrated [0, 1, 2, 6]" in str(summ)
    # another pass count, another T, another predictor, or use_calibrated=False: the spaced rule
    for T, cfg in ((8, TCPadeConfig.budget(passes=3)), (9, TCPadeConfig.budget(passes=4)),
                   (8, TCPadeConfig.budget(passes=4, predictor="linear")),
                   (8, TCPadeConfig.budget(passes=4, use_calibrated=False))):  # fmt: skip
        _, summ = _sample(tr, T, cfg)
        assert summ.computed("cond") == list(schedules.spaced(T, cfg.passes)), (T, cfg)
        assert "schedule: spaced rule" in str(summ)
    with pytest.raises(ValueError, match="4 passes has 3 steps"):
        schedules.register(schedules.model_key(tr), "rational", 8, {4: (0, 1, 2)})


def test_registry_keeps_out_a_schedule_that_lost_its_held_out_check(registry):
    """A held-out check (calibrated dB, spaced rule dB): a schedule is used only where it is strictly
    higher; one that lost (or tied) leaves the spaced rule, and replaces an earlier registration;
    the checks of both kinds stay known (the summary shows them)."""
    tr = _tiny_flux()
    key = schedules.model_key(tr)
    assert schedules.wins(None) and schedules.wins((30.1, 30.0))
    assert not schedules.wins((30.0, 30.0)) and not schedules.wins((29.0, 30.0))
    schedules.register(key, "rational", 8, {4: (0, 1, 2, 6), 3: (0, 1, 4)}, psnr={4: 40.0, 3: 30.0})  # unvalidated
    assert schedules.lookup(tr, "rational") == ((8, (0, 1, 4)), (8, (0, 1, 2, 6)))
    schedules.register(key, "rational", 8, {4: (0, 1, 2, 6), 3: (0, 1, 4)}, psnr={4: 40.0, 3: 30.0},
                       validation={4: (35.0, 36.0), 3: (31.0, 30.5)})  # fmt: skip
    assert schedules.lookup(tr, "rational") == ((8, (0, 1, 4)),)
    assert schedules.checks(tr, "rational") == ((8, 3, 31.0, 30.5, "rational"), (8, 4, 35.0, 36.0, "rational"))
    resolved = schedules.resolve(TCPadeConfig.budget(passes=4), tr)
    assert resolved.plan(8) == schedules.spaced(8, 4) and resolved.plan_source(8) == "spaced rule"
    assert resolved.plan_note(8) == ("the calibrated schedule did not beat it on held-out inputs: 35.00 dB, "
                                     "spaced rule 36.00 dB")
    resolved = schedules.resolve(TCPadeConfig.budget(passes=3), tr)
    assert resolved.plan(8) == (0, 1, 4) and resolved.plan_note(8) == "held-out 31.00 dB, spaced rule 30.50 dB"
    _, summ = _sample(tr, 8, TCPadeConfig.budget(passes=4))
    assert summ.computed("cond") == list(schedules.spaced(8, 4))
    assert "schedule: spaced rule" in str(summ) and "did not beat it on held-out inputs: 35.00 dB" in str(summ)
    # two predictors' schedules lost there: the note gives the better check; one that won would run
    schedules.register(key, "linear", 8, {4: (0, 2, 3, 6)}, validation={4: (35.5, 36.0)})
    both = schedules.resolve(TCPadeConfig.budget(passes=4, calibrated_predictor=True), tr)
    assert both.plan_source(8) == "spaced rule" and both.predictor_for(8) == "rational"
    assert both.plan_note(8) == ("none of the 2 calibrated schedules beat it on held-out inputs: the best 35.50 dB, "
                                 "spaced rule 36.00 dB")
    schedules.register(key, "linear", 8, {4: (0, 2, 3, 6)}, validation={4: (36.5, 36.0)})
    both = schedules.resolve(TCPadeConfig.budget(passes=4, calibrated_predictor=True), tr)
    assert both.plan(8) == (0, 2, 3, 6) and both.predictor_for(8) == "linear"
    assert both.plan_note(8) == "held-out 36.50 dB, spaced rule 36.00 dB"
    schedules.register(key, "linear", 8, {4: (0, 2, 3, 6)}, validation={4: (35.5, 36.0)})
    # every pass count lost: the config's own predictor, the spaced rule, the checks still shown
    schedules.register(key, "rational", 8, {3: (0, 1, 4)}, validation={3: (29.0, 30.5)})
    resolved = schedules.resolve(TCPadeConfig.budget(passes=3), tr)
    assert resolved.calibrated == () and resolved.plan_source(8) == "spaced rule"
    assert "did not beat it on held-out inputs: 29.00 dB" in resolved.plan_note(8)
    assert TCPadeConfig.budget(passes=3).plan(8) == resolved.plan(8)
    # with calibrated_predictor and no schedule in use anywhere, every predictor's lost checks still show
    assert schedules.best_schedules(tr) == ()
    both = schedules.resolve(TCPadeConfig.budget(passes=4, calibrated_predictor=True), tr)
    assert both.calibrated == () and both.plan_note(8).startswith("none of the 2 calibrated schedules beat it")
    with pytest.raises(ValueError, match="held-out check for 3 passes must be"):
        schedules.register(key, "rational", 8, {3: (0, 1, 4)}, validation={3: 29.0})


def test_carry_moves_a_schedule_along_the_time_axis():
    """``carry``: leading steps kept; with as many passes each computed step goes to the target step
    whose time is nearest; with more or fewer the source's density is followed, the last one
    where the source's is (or, ``keep_end``, as far from the end). (Two leading steps, as the paper's
    predictor needs, unless a test says otherwise.)"""
    frac = schedules.run_fraction
    src = (0, 1, 3, 6, 9, 12, 15, 18)
    assert schedules.carry(src, frac(20), frac(20), lead=2) == src  # the same axis: the same schedule
    assert schedules.carry(src, frac(20), frac(39), passes=8, lead=2) == (0, 1, 6, 12, 18, 24, 30, 36)
    # the pass count scales with T' / T by default: 8 of 20 -> 4 of 10; the source's step 18 of 20
    # (time 0.947) is nearest to the final step 9 of 10 (1.0), unless the end is kept
    assert schedules.carry(src, frac(20), frac(10), lead=2) == (0, 1, 4, 9)
    assert schedules.carry(src, frac(20), frac(10), keep_end=True, lead=2) == (0, 1, 4, 8)
    assert len(schedules.carry(src, frac(20), frac(50), lead=2)) == 20
    # a decreasing axis: flow sigmas 1 - k/T (the fraction of the run is k/(T-1): other nearest steps)
    sigmas = lambda t: [1 - k / t for k in range(t)]  # noqa: E731
    assert schedules.carry(src, sigmas(20), sigmas(28), passes=8, lead=2) == (0, 1, 4, 8, 13, 17, 21, 25)
    assert schedules.carry(src, frac(20), frac(28), passes=8, lead=2) == (0, 1, 4, 9, 13, 17, 21, 26)
    # more passes than the source: the cumulative count of its steps 2 and 5 of 10, sampled at 5 equal parts
    assert schedules.carry((0, 2, 5), frac(10), frac(20), lead=1) == (0, 2, 3, 5, 8, 11)
    with pytest.raises(ValueError, match="carry: steps must be"):
        schedules.carry((0, 1, 1), frac(20), frac(10), lead=2)
    with pytest.raises(ValueError, match="carry: steps must start with steps 0..1"):
        schedules.carry((0, 2, 5), frac(20), frac(10), lead=2)
    with pytest.raises(ValueError, match="carry: passes must be an int"):
        schedules.carry(src, frac(20), frac(10), passes=4.0, lead=2)


def test_shipped_zoo_schedules_load():
    schedules.clear()
    from tcpade import zoo

    tr = zoo.load("flux-digits").transformer
    found = schedules.lookup(tr, "rational")
    # every step count shipped has its held-out checks; the schedules used are those that won them
    assert {t for t, *_ in schedules.checks(tr, "rational")} == {10, 20, 28, 50} and found
    assert all(any(t == c[0] and len(steps) == c[1] and c[2] > c[3] for c in schedules.checks(tr, "rational"))
               for t, steps in found)  # fmt: skip
    for t, steps in found:
        TCPadeConfig(schedule=steps, schedule_steps=t)  # valid


def test_shipped_calibrations_are_validated_and_the_losers_not_used():
    """Every shipped zoo calibration carries its held-out check; a pass count whose schedule lost
    to the spaced rule there is not registered, and the budget runs the spaced rule at it."""
    import json

    schedules.clear(shipped=False)
    schedules.load(schedules.SHIPPED)
    with open(schedules.SHIPPED) as f:
        entries = schedules.entries_from_json(json.load(f))
    lost = 0
    for e in entries:
        checks = schedules.entry_checks(e)
        assert checks is not None and sorted(checks) == sorted(int(p) for p in e["schedules"]), e["name"]
        for p, steps in e["schedules"].items():
            key = e["model"], e["predictor"], e["steps"], int(p)
            registered = schedules._REGISTRY[key[0]][key[1]][key[2]].get(key[3])
            assert (registered is not None) == schedules.wins(checks[int(p)]), key
            assert registered is None or registered == tuple(steps)
            lost += registered is None
    assert 0 < lost < sum(len(e["schedules"]) for e in entries)
    schedules.clear()


def test_a_run_of_another_length_is_refused_at_its_first_call():
    cfg = TCPadeConfig(schedule=(0, 1, 5), schedule_steps=10)
    with pytest.raises(ValueError, match="schedule_steps=10 steps, this run has 12"):
        _computed(cfg, 12, branches=("cond",))
    assert _computed(cfg.rescaled(12), 12, branches=("cond",))["cond"] == [0, 1, 6]


def _reference_time_spaced(T, K, times, a):
    """spaced() on the run's time, written out in float64 with numpy (lead 1, the last computed step
    one before the end): w(k) = (1 - a) k / (T - 1) + a (t0 - t_k) / (t0 - t_{T-1}); K - 1 steps at
    w = w(T - 2) (i + 1) / (K - 1), their fractional k by linear interpolation, rounded."""
    np = pytest.importorskip("numpy")
    t = np.asarray(times, dtype=np.float64)
    k = np.arange(T, dtype=np.float64)
    w = (1 - a) * k / (T - 1) + a * (t[0] - t) / (t[0] - t[-1])
    targets = w[T - 2] * np.arange(1, K) / (K - 1)
    return (0, *(int(round(x)) for x in np.interp(targets, w, k)))


@pytest.mark.parametrize("shift", [3.0, 7.0])
@pytest.mark.parametrize("T, K", [(20, 10), (20, 8), (20, 7), (28, 11), (50, 20), (50, 12), (10, 4)])
def test_spaced_rule_on_the_runs_time(shift, T, K):
    """TCPadeConfig.time_spacing a: the spaced rule's steps evenly on a blend of the step index and
    the run's time. On a shifted flow-matching schedule (time fastest at the end) they move toward
    the end; the pass count, step 0 and the last computed step stay; it equals a float64 numpy
    reference; a = 0, no times, or times even in k give the rule on the step index."""
    times = [1000.0 * s for s in flow_sigmas(T, shift)]
    plain = schedules.spaced(T, K)
    assert schedules.spaced(T, K, times=times, time_weight=0.0) == plain
    assert schedules.spaced(T, K, times=None, time_weight=0.5) == plain
    even = [950.0 - 50.0 * k for k in range(T)]  # DDIM's: even in the step index
    assert schedules.spaced(T, K, times=even, time_weight=1.0) == plain
    for a in (0.25, 0.5, 1.0):
        got = schedules.spaced(T, K, times=times, time_weight=a)
        assert len(got) == K and got[0] == 0 and got[-1] == plain[-1] == T - 2
        assert list(got) == sorted(set(got))
        ref = _reference_time_spaced(T, K, times, a)
        if list(ref) == sorted(set(ref)):  # (where two steps round alike the rule spreads them: above)
            assert got == ref
        assert sum(got) >= sum(plain)  # later on average: the time moves fastest at the end
        # an increasing time axis places the same steps (negation keeps every difference exact)
        assert schedules.spaced(T, K, times=[-x for x in times], time_weight=a) == got


def test_spaced_rule_on_the_runs_time_refuses_bad_times():
    t = [1000.0 * s for s in flow_sigmas(20)]
    with pytest.raises(ValueError, match="one entry per step"):
        schedules.spaced(20, 8, times=t[:-1], time_weight=0.5)
    with pytest.raises(ValueError, match="strictly monotonic"):
        schedules.spaced(20, 8, times=t[:10] + t[9:19], time_weight=0.5)  # a repeated time
    with pytest.raises(ValueError, match="finite"):
        schedules.spaced(20, 8, times=t[:5] + [math.nan] + t[6:], time_weight=0.5)
    for bad in (1.5, -0.1, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="time_weight must be a number in"):
            schedules.spaced(20, 8, times=t, time_weight=bad)


class _Clock:
    """A loop's clock: the current step's time, and the run's times (as tcpade.sample's)."""

    def __init__(self, times):
        self.times, self.index = times, 0

    def __call__(self):
        return self.times[self.index]

    def run_times(self, total):
        return self.times if len(self.times) == total else None


class _NowOnly(_Clock):
    """A clock that knows the current step's time only (no run_times)."""

    run_times = None


@pytest.mark.parametrize("times, kind, placed", [
    ([1000.0 * s for s in flow_sigmas(20, 3.0)], _Clock, True),    # shifted: the rule on the run's times
    ([950.0 - 50.0 * k for k in range(20)], _Clock, False),        # even in k: the rule on the index anyway
    ([1000.0 * s for s in flow_sigmas(20, 3.0)], _NowOnly, False),  # no run's times: the index
])  # fmt: skip
def test_runtime_places_the_spaced_rule_on_the_clocks_times(times, kind, placed):
    """The runtime takes the run's times from its clock (tcpade.sample's loop, a pipeline's
    scheduler) at step 0 and computes the spaced rule on them; where the clock has none, on the
    step index (config.plan(T))."""
    cfg = TCPadeConfig.budget(passes=8, predictor="linear")
    rt = Runtime(cfg)
    rt.set_steps(20)
    clock = kind(times)
    done = []
    with rt.steps.clocked(clock):
        for k in range(20):
            clock.index = k
            h_in = torch.full(SHAPE, 1.0 - k / 20)
            predict = rt.decide("cond", torch.tensor(0.0))
            if predict is None:
                rt.finish("cond", h_in, h_in * 1.01)
                done.append(k)
            else:
                predict(h_in)
                rt.finish("cond", None, None)
    expect = cfg.plan(20, times) if placed else cfg.plan(20)
    assert done == list(expect)
    assert (tuple(done) != cfg.plan(20)) == placed
    assert cfg.plan(20, times if placed else None) == tuple(done)


def test_a_presets_explicit_pass_count_is_kept():
    """fast(passes=K) computes exactly K (T >= K) at every T, on the run's times too: at most 3
    steps predicted in a row where K can keep that (the last step stays), else the placement on
    the times as the plain budget has it."""
    for shift in (3.0, 7.0):
        for T in range(4, 41):
            times = [1000.0 * s for s in flow_sigmas(T, shift)]
            for k in range(1, T + 1):
                placed = TCPadeConfig.fast(passes=k).plan(T, times)
                assert len(placed) == k and placed[0] == 0, (shift, T, k, placed)
                if k >= schedules.min_passes(T, 3):
                    assert schedules.longest_skip_run(placed, T) <= 3, (shift, T, k, placed)
                    assert placed[-1] == TCPadeConfig.fast(passes=k).plan(T)[-1]  # the last step stays
                else:
                    assert placed == TCPadeConfig.budget(passes=k, predictor="linear").plan(T, times)


def test_presets_keep_their_max_run_on_the_runs_time():
    """slow() / fast() never predict more than 3 steps in a row (budget_max_run), also where the
    spaced rule is placed on the run's times and its steps crowd toward the end: a gap the placement
    opens early moves back (cap_runs), the pass count and the last step stay."""
    for shift in (3.0, 7.0):
        for T in range(4, 61):
            times = [1000.0 * s for s in flow_sigmas(T, shift)]
            for cfg in (TCPadeConfig.slow(), TCPadeConfig.fast(), TCPadeConfig.slow(speedup=2)):
                placed, plain = cfg.plan(T, times), cfg.plan(T)
                assert len(placed) == len(plain) and placed[0] == 0 and placed[-1] == plain[-1], (T, placed)
                assert schedules.longest_skip_run(placed, T) <= 3, (shift, T, placed)
    assert schedules.cap_runs((0, 5, 8), 3) == (0, 4, 8)
    assert schedules.cap_runs((0, 5, 9, 13, 16, 19, 22, 24, 26), 3) == (0, 4, 8, 12, 16, 19, 22, 24, 26)
    assert schedules.cap_runs((0, 3, 5, 8), 3) == (0, 3, 5, 8)  # nothing to cut: unchanged
    # a budget without budget_max_run keeps the placement as it is
    t = [1000.0 * s for s in flow_sigmas(10, 3.0)]
    assert TCPadeConfig.budget(passes=3, predictor="linear").plan(10, t) == schedules.spaced(10, 3, times=t,
                                                                                             time_weight=0.5)  # fmt: skip
