"""The skip policy and the per-branch runtime, driven by a synthetic block stack.

The "model" here is exact and cheap: the block stack's residual is a smooth rational
function of the schedule's sigma, so predictions can be compared with the truth and the
number of block-stack passes counted directly.
"""

import math
import warnings

import pytest
import torch
from helpers import SYNTH_SHAPE, flow_sigmas, rule_fast, rule_slow
from helpers import synthetic_run as run
from helpers import truth as _truth

from tcpade.policy.config import TCPadeConfig
from tcpade.policy.runtime import Runtime

SHAPE = SYNTH_SHAPE


class EveryRead(Runtime):
    """The oracle of the deferred reads: every earlier write's sums read at every call."""

    def decide(self, branch, timestep, force=None):
        b = self._branches.get(branch)
        if not b.reset_pending and b.pending is None:
            self.reader.read(b)
        return super().decide(branch, timestep, force)


@pytest.mark.parametrize(
    "preset, T, computed",
    [("slow", 20, 8), ("slow", 28, 11), ("slow", 50, 20), ("slow", 10, 4), ("fast", 20, 7), ("fast", 28, 9),
     ("fast", 50, 17), ("fast", 10, 3), ("paper", 20, 9), ("paper", 50, 17)],
)
def test_presets_skip_the_expected_share(preset, T, computed):
    cfg = getattr(TCPadeConfig, preset)()
    rt, passes, errors, _ = run(cfg, T)
    assert passes["default"] == computed
    rec = rt.records("default")
    assert [r.k for r in rec] == list(range(T))
    assert sum(r.computed for r in rec) == computed
    assert all(math.isfinite(e) for e in errors["default"])


@pytest.mark.parametrize("preset", ["slow", "fast"])
def test_presets_take_a_pass_count_instead_of_their_speedup(preset):
    """``fast(passes=16)`` is the preset at 16 passes (its speedup dropped, not "exactly one of"
    refused), with the presets' guard; an explicit count is kept even where it cannot keep 3 steps
    in a row (12 of 50)."""
    make = getattr(TCPadeConfig, preset)
    cfg = make(passes=16)
    assert (cfg.passes, cfg.speedup) == (16, None)
    assert cfg.budget_max_run == make().budget_max_run == 3 and cfg.predictor == make().predictor
    assert run(cfg, 50)[1]["default"] == 16
    assert make(passes=12).budget_passes(50) == 12 and make(speedup=4.2).budget_passes(50) == 13
    assert make(passes=None) == make()  # passes=None: the preset's own speedup
    with pytest.raises(ValueError, match="exactly one of passes=K or speedup=S"):
        make(passes=16, speedup=3.0)


def test_operating_points_at_20_steps():
    assert 20 / run(TCPadeConfig.slow(), 20)[1]["default"] == pytest.approx(2.5)
    assert 20 / run(TCPadeConfig.fast(), 20)[1]["default"] == pytest.approx(2.86, abs=0.01)
    # the paper's two points, as fixed TSI rules
    assert 20 / run(rule_slow(), 20)[1]["default"] == pytest.approx(2.22, abs=0.01)
    assert 20 / run(rule_fast(interval=6, max_skips=5, final_steps=1), 20)[1]["default"] == pytest.approx(2.86, abs=0.01)


def test_tsi_threshold_is_monotone():
    counts = [run(rule_slow(tsi_threshold=th), 20)[1]["default"] for th in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 20  # a threshold of 0 blocks every skip


def test_error_policy_tolerance_is_monotone_and_accurate():
    results = []
    for tol in (1e-5, 1e-3, 1e-2, 5e-2, 2e-1):
        cfg = TCPadeConfig(predictor="rational", policy="error", tolerance=tol, warmup=2, max_skips=4)
        _, passes, errors, _ = run(cfg, 20)
        results.append((tol, passes["default"], max(errors["default"], default=0.0)))
    counts = [p for _, p, _ in results]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 20 and counts[-1] <= 10
    # The error actually made on skipped steps stays of the order of the tolerance.
    for tol, _, worst in results:
        assert worst <= 4 * tol


def test_max_skips_caps_runs():
    cfg = TCPadeConfig(predictor="rational", policy="error", tolerance=1.0, warmup=2, max_skips=2)
    rt, _, _, _ = run(cfg, 20)
    flags = [r.computed for r in rt.records("default")]
    longest = max(len(x) for x in "".join("c" if f else "s" for f in flags).split("c"))
    assert longest == 2


@pytest.mark.parametrize("preset", ["paper", "slow"])
def test_nan_in_a_fixed_schedule_is_reported_and_changes_no_decision(preset):
    """A fixed schedule reads nothing from the device to decide: a NaN in a computed h_out
    changes no decision; the summary reports it (and the skips that predicted from it)."""
    cfg = getattr(TCPadeConfig, preset)()
    at = 8  # a computed step of both plans (slow: 0 3 5 8 10 13 15 18; paper: 0 1 2 3 4 8 12 16 19)
    rt, passes, _, _ = run(cfg, 20, nan_at=at)
    assert rt.host_reads == 0
    rec = rt.records("default")
    assert [r.k for r in rec if r.computed] == list(cfg.plan(20))
    assert rec[at].computed and rec[at].nonfinite
    assert not any(r.nonfinite for r in rec[:at])


@pytest.mark.parametrize("cfg", [TCPadeConfig(tolerance=0.3), rule_slow(tsi_threshold=0.9)],
                         ids=["error", "tsi-blocking"])  # fmt: skip
def test_nan_forces_full_computation_from_then_on(cfg):
    """A trajectory-dependent policy reads the sums anyway: after a NaN it computes every step."""
    rt, passes, _, _ = run(cfg, 20, nan_at=8)
    rec = rt.records("default")
    assert rec[8].computed and rec[8].nonfinite
    assert all(r.computed for r in rec[8:]), "every step after the NaN must be computed"
    assert all(r.reason in ("nonfinite", "final") for r in rec[9:])
    assert sum(r.reason == "nonfinite" for r in rec) >= 10


def test_nonfinite_prediction_falls_back_and_is_reported():
    """A NaN in the embedded input of a skipped step: the prediction's non-finite elements are
    h_in + R1 (here NaN only where h_in is NaN: the model, not tcpade, owns that NaN), the
    step stays skipped, and its record says non-finite."""
    cfg = rule_slow()
    rt, passes, _, outs = run(cfg, 20, nan_input_at=6)
    rec = rt.records("default")
    assert rt.host_reads == 1  # the records above: one wait, after the run
    assert not rec[6].computed and rec[6].nonfinite
    assert [r.k for r in rec if r.computed] == list(cfg.plan(20))
    bad = ~torch.isfinite(outs["default"][6])
    assert bad.sum() == 1 and bad[0, 1, 1]


def test_branches_never_share_state():
    """cond and uncond follow different trajectories: interleaving them must give each
    exactly what it gets alone. (Sharing one history would mix their residuals.)"""
    cfg = rule_slow()
    _, _, _, both = run(cfg, 20, branches=("cond", "uncond"))
    _, _, _, cond = run(cfg, 20, branches=("cond",))
    _, _, _, uncond = run(cfg, 20, branches=("uncond",), shape_seed=1)
    for a, b in zip(both["cond"], cond["cond"]):
        assert torch.equal(a, b)
    for a, b in zip(both["uncond"], uncond["uncond"]):
        assert torch.equal(a, b)


def test_repeated_runs_identical_and_restart_detected():
    cfg = rule_slow()
    rt = Runtime(cfg)
    _, p1, _, o1 = run(cfg, 20, rt=rt)
    _, p2, _, o2 = run(cfg, 20, rt=rt)
    assert p1 == p2 and all(torch.equal(a, b) for a, b in zip(o1["default"], o2["default"]))
    # A run abandoned at step 7 (say, an exception in the user's loop): the next run's
    # first timestep is recognised as a new run, not as step 7.
    run(cfg, 20, rt=rt, stop_at=7)
    _, p3, _, o3 = run(cfg, 20, rt=rt)
    assert p3 == p1 and all(torch.equal(a, b) for a, b in zip(o1["default"], o3["default"]))


def test_exception_inside_block_stack_resets_branch():
    cfg = rule_slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    assert rt.decide("default", 1.0) is None
    # finish() never comes (the blocks raised). The next run starts clean.
    _, p, _, _ = run(cfg, 20, rt=rt)
    assert p["default"] == 9


def test_step_count_and_shape_changes_between_runs():
    cfg = rule_fast()
    rt = Runtime(cfg)
    assert run(cfg, 20, rt=rt)[1]["default"] == 7
    assert run(cfg, 50, rt=rt)[1]["default"] == 15
    assert run(cfg, 20, rt=rt, shape=(2, 9, 40))[1]["default"] == 7


def test_shape_change_mid_run_starts_a_new_run_at_that_call():
    """A call whose h_in no longer fits the history (another batch, say) mid-run: a planned skip
    is computed instead, and the run starts over at that call."""
    cfg = rule_slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    small, big = _truth(0), _truth(1, (2, 9, 40))
    sig = flow_sigmas(20)
    for k in range(6):  # steps 0-4 computed, 5 skipped
        h, r = small(sig[k])
        p = rt.decide("default", sig[k])
        rt.finish("default", *((h, h + r) if p is None or p(h) is None else (None, None)))
    h, r = big(sig[6])
    p = rt.decide("default", sig[6])
    assert p is not None and p(h) is None  # planned as a skip; the history cannot predict this h_in
    rt.finish("default", h, h + r)
    rec = rt.records("default")
    assert [(r.k, r.computed, r.reason) for r in rec] == [(0, True, "warmup")]
    assert rt.branches["default"].history.ring.shape[1:] == (2, 9, 40)


def test_the_run_a_shape_change_starts_follows_the_budgets_plan():
    """The new run that a shape change mid-run starts is planned like any other: a budget computes
    its plan's steps there too (its step 0 is the call where the shape changed), not the policy's."""
    cfg = TCPadeConfig.budget(passes=8, predictor="linear")
    rt = Runtime(cfg)
    rt.set_steps(20)
    small, big = _truth(0), _truth(1, (2, 9, 40))
    sig = flow_sigmas(20)
    for k in range(6):
        h, r = small(sig[k])
        p = rt.decide("default", sig[k])
        rt.finish("default", *((h, h + r) if p is None or p(h) is None else (None, None)))
    plan = cfg.plan(20)
    assert 6 not in plan  # the shape changes on a planned skip, so the history cannot predict it
    # a whole run of 20 steps at the new shape, its step 0 at the change; its times go on falling
    # (time going back up would start a new run by itself)
    later = [sig[6] * (1 - k / 20) for k in range(20)]
    for k in range(20):
        h, r = big(later[k])
        p = rt.decide("default", later[k])
        rt.finish("default", *((h, h + r) if p is None or p(h) is None else (None, None)))
    rec = rt.records("default")
    assert [r.k for r in rec] == list(range(20))
    assert tuple(r.k for r in rec if r.computed) == plan
    assert {r.reason for r in rec if r.computed} == {"schedule"}  # step 0 too, as in any planned run
    assert rt.branches["default"].run.planned


def test_unknown_step_count_computes_everything_with_a_warning():
    rt = Runtime(rule_fast())
    step = _truth(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in flow_sigmas(10):
            h_in, r = step(s)
            assert rt.decide("default", s) is None
            rt.finish("default", h_in, h_in + r)
    msgs = [w for w in caught if "number of denoising steps is unknown" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].filename == __file__  # attributed to the caller's line


def test_finish_without_decide():
    rt = Runtime()
    with pytest.raises(RuntimeError, match="without a matching decide"):
        rt.finish("default", torch.zeros(SHAPE), torch.zeros(SHAPE))


def _bare_run(rt, T, seed=0):
    step = _truth(seed)
    for s in flow_sigmas(T):
        h_in, r = step(s)
        p = rt.decide("default", torch.tensor([s]))
        if p is None or p(h_in) is None:
            rt.finish("default", h_in, h_in + r)
        else:
            rt.finish("default", None, None)


def test_shorter_run_than_num_steps_is_warned_once_with_both_numbers():
    rt = Runtime(rule_slow(), num_steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bare_run(rt, 8)
        rt.reset()  # the run ends (a pipeline resets its hooks at the end of a call)
        _bare_run(rt, 8)
        rt.reset()
    msgs = [str(w.message) for w in caught if "tcpade" in str(w.message)]
    assert len(msgs) == 1 and "8 steps" in msgs[0] and "20" in msgs[0], msgs
    assert caught[0].filename == __file__


def test_longer_run_than_num_steps_continues_computing_and_warns_once():
    """A 30-step run with num_steps=20: no silent restart at step 20; steps 20-29 are computed."""
    cfg = rule_slow()
    rt = Runtime(cfg, num_steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bare_run(rt, 30)
    msgs = [str(w.message) for w in caught if "tcpade" in str(w.message)]
    assert len(msgs) == 1 and "longer than the 20 steps" in msgs[0] and "step 21" in msgs[0], msgs
    rec = rt.records("default")
    assert [r.k for r in rec] == list(range(30))
    assert [r.k for r in rec if r.computed] == list(cfg.plan(20)) + list(range(20, 30))
    assert all(r.reason == "beyond-steps" for r in rec[20:])


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(predictor="pade"), "predictor"),
        (dict(policy="teacache"), "policy"),
        (dict(warmup=-1), "warmup"),
        (dict(interval=1.5), "interval"),
        (dict(max_skips=True), "max_skips"),
        (dict(tolerance=0.0), "tolerance"),
        (dict(tolerance=float("inf")), "tolerance"),
        (dict(tsi_threshold=-0.1), "tsi_threshold"),
        (dict(early_frac=0.9), "early_frac"),
        (dict(pole_delta=1.0), "pole_delta"),
        (dict(kappa=-1.0), "kappa"),
        (dict(history_slots=2), "history_slots"),
        (dict(input_correction=float("nan")), "input_correction"),
    ],
)
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"TCPadeConfig\.{field}"):
        TCPadeConfig(**kw)


def test_runtime_rejects_non_config():
    with pytest.raises(TypeError, match="TCPadeConfig"):
        Runtime(config={"predictor": "paper"})


def test_increasing_time_schedule_skips_and_restarts():
    """A schedule whose time grows (t = step index, as some research loops pass it) is one run,
    not a restart at every second call; its time going back down starts a new run."""
    cfg = rule_slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    for run_index in range(2):
        for k in range(20):
            h_in = a * (1 + 0.01 * k)
            p = rt.decide("default", float(k))
            if p is None or p(h_in) is None:
                rt.finish("default", h_in, h_in + b * (1 + 0.05 * k))
            else:
                rt.finish("default", None, None)
        recs = rt.records("default")
        assert [r.k for r in recs] == list(range(20)), run_index
        assert sum(r.computed for r in recs) == 9, run_index


PLAN_CONFIGS = [
    rule_slow(), rule_fast(), TCPadeConfig.paper(),
    rule_fast(interval=6, max_skips=5, final_steps=1),
    rule_slow(warmup=0, interval=0, max_skips=7), rule_slow(max_skips=0),
    rule_slow(predictor="reuse", warmup=0, final_steps=3),
    TCPadeConfig.paper(warmup=0, interval=0, max_skips=4),
    rule_slow(history_slots=5, interval=5, final_steps=2),
]  # fmt: skip


@pytest.mark.parametrize("cfg", PLAN_CONFIGS, ids=range(len(PLAN_CONFIGS)))
@pytest.mark.parametrize("T", [1, 7, 20, 33])
def test_plan_is_what_the_runtime_computes(cfg, T):
    """config.plan(T) lists exactly the steps a run computes, and such a run never waits."""
    rt, passes, _, _ = run(cfg, T, branches=("cond", "uncond"))
    assert rt.host_reads == 0
    for br in ("cond", "uncond"):
        assert tuple(r.k for r in rt.records(br) if r.computed) == cfg.plan(T)


def test_plan_is_none_when_the_trajectory_decides():
    assert TCPadeConfig().plan(20) is None
    assert TCPadeConfig.adaptive().plan(20) is None
    assert rule_slow(tsi_threshold=0.5).plan(20) is None
    assert rule_slow().plan(20) == (0, 1, 2, 3, 4, 8, 12, 16, 19)
    with pytest.raises(ValueError, match="total steps"):
        rule_slow().plan(0)


def test_forced_call_is_computed_with_its_reason():
    cfg = rule_slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    step = _truth(0)
    for k, s in enumerate(flow_sigmas(20)):
        h_in, r = step(s)
        p = rt.decide("default", s, force="controlnet" if k == 6 else None)
        if p is None:
            rt.finish("default", h_in, h_in + r)
        else:
            p(h_in)
            rt.finish("default", None, None)
    rec = rt.records("default")
    assert rec[6].computed and rec[6].reason == "controlnet"
    assert [r.k for r in rec if not r.computed] == [5, 7, 9, 10, 11, 13, 14, 15, 17, 18]


CONFIGS = {
    "slow": rule_slow(),
    "fast": rule_fast(),
    "paper": TCPadeConfig.paper(),
    "error": TCPadeConfig(),
    "error-loose": TCPadeConfig(tolerance=0.3),
    "error-paper": TCPadeConfig(predictor="paper", tolerance=0.3, history_slots=5),
    "tsi-blocks": rule_slow(tsi_threshold=0.05, store_predictions=True),
    "budget-slow": TCPadeConfig.slow(),
    "budget-fast": TCPadeConfig.fast(),
    "auto": TCPadeConfig.fast(predictor="auto"),
    "auto-error": TCPadeConfig(predictor="auto", tolerance=0.3),
}
FIELDS = ("k", "computed", "reason", "stage", "nonfinite")


@pytest.mark.parametrize("nan", [None, "output"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_deferred_reads_decide_exactly_as_eager_reads(name, nan):
    """Reading the device sums only when a decision needs them changes no decision, no record
    and no output bit; fixed schedules read nothing until the summary."""
    cfg = CONFIGS[name]
    kw = {"output": dict(nan_at=2)}.get(nan, {})  # 2: then warm-up computes
    runs = {}
    for kind, rt in [("eager", EveryRead(cfg)), ("deferred", Runtime(cfg))]:
        rt, passes, _, outs = run(cfg, 20, branches=("cond", "uncond"), rt=rt, **kw)
        runs[kind] = (rt, passes, outs, rt.host_reads)  # waits before the records are read
    (eager, p_e, o_e, r_e), (lazy, p_l, o_l, r_l) = runs["eager"], runs["deferred"]
    assert p_e == p_l
    for br in ("cond", "uncond"):
        a, b = eager.records(br), lazy.records(br)
        assert [[getattr(r, f) for f in FIELDS] for r in a] == [[getattr(r, f) for f in FIELDS] for r in b]
        for ra, rb in zip(a, b):
            for f in ("tsi", "error"):
                x, y = getattr(ra, f), getattr(rb, f)
                assert x == y or (math.isnan(x) and math.isnan(y)), (br, ra.k, f, x, y)
        for x, y in zip(o_e[br], o_l[br]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert r_l < r_e, (r_l, r_e)
    if cfg.plan(20) is not None:
        assert r_l == 0


def test_waits_per_run():
    """Host waits of one 20-step run with two branches, before the summary reads the records:
    none for a fixed schedule; the error policy waits only where a decision needs the sums."""
    waits = {}
    for name in ("slow", "fast", "paper", "budget-slow", "budget-fast", "auto", "error-loose"):
        rt = run(CONFIGS[name], 20, branches=("cond", "uncond"))[0]
        waits[name] = rt.host_reads
    assert waits["slow"] == waits["fast"] == waits["paper"] == waits["budget-slow"] == waits["budget-fast"] == 0
    assert waits["auto"] == 0
    assert 0 < waits["error-loose"] <= 2 * 20


def test_one_rule_for_the_plan_and_the_live_decision(monkeypatch):
    """``Rule.reason`` is the rule of both: the plans of the TSI policy simulate a run with it, and
    a run decided live asks it at every call. Changing it changes both alike."""
    from tcpade.policy.rule import Rule

    assert 6 not in rule_slow().plan(20)
    original = Rule.reason
    monkeypatch.setattr(Rule, "reason", lambda self, k, T, state: "moved" if k == 6 else original(self, k, T, state))
    assert 6 in rule_slow().plan(20)
    for cfg in (rule_slow(), rule_slow(tsi_threshold=0.5)):  # a plan; decided live
        rt = run(cfg, 20)[0]
        rec = rt.records("default")
        assert rec[6].computed and rec[6].reason == "moved", cfg
