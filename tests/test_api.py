"""tcpade.apply / remove / summary on real diffusers pipelines with tiny random weights.

Random weights make trajectories meaningless for quality, so these tests check the
mechanics: the share of calls skipped, that a skipped call runs no block, state per CFG
branch, resets between pipeline calls, bit-identical output after remove(), and the
handling of NaN. (Quality against the full run is bench/quality.py's job, on trained
models.)
"""

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import BlockBodyCounter, rule_fast, rule_slow  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig, schedules  # noqa: E402
from tcpade.tools.tiny import FAMILIES  # noqa: E402
from tcpade.tools.tiny import dit_pipeline as _dit_pipeline  # noqa: E402
from tcpade.tools.tiny import flux_pipeline as _flux_pipeline  # noqa: E402
from tcpade.tools.tiny import sd3_pipeline as _sd3_pipeline  # noqa: E402
from tcpade.tools.tiny import wan_pipeline as _wan_pipeline  # noqa: E402

PIPELINES = {"wan": (_wan_pipeline, ("cond", "uncond")), "flux": (_flux_pipeline, ("cond", "uncond")),
             "dit": (_dit_pipeline, ("default",)), "sd3": (_sd3_pipeline, ("default",))}  # fmt: skip


CLOSE = {"wan": 0.05, "flux": 0.05, "sd3": 0.05, "dit": None}


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline(request):
    make, branches = PIPELINES[request.param]
    pipe, generate = make()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        base20 = generate(20)
    return request.param, pipe, generate, branches, base20


@torch.no_grad()
def test_apply_skips_the_preset_share_and_remove_restores(pipeline):
    name, pipe, generate, branches, base20 = pipeline
    counter = BlockBodyCounter(pipe.transformer)
    generate(20)
    full_counts = counter.snapshot()
    counter.counts = dict.fromkeys(full_counts, 0)

    tcpade.apply(pipe, TCPadeConfig.slow())
    try:
        out = generate(20)
        counts = counter.snapshot()
        s = tcpade.summary(pipe)
        assert sorted(s.branches) == sorted(branches)
        # the spaced rule on the run's times (the pipeline scheduler's: the tiny Wan pipeline's shifted
        # flow matching moves the steps toward the end; the others' times are even in the step index
        # here, so the rule on the index: 0 3 5 8 10 13 15 18)
        times = [float(t) for t in pipe.scheduler.timesteps]
        plan = TCPadeConfig.slow().plan(20, times)
        assert len(plan) == 8 and (plan == (0, 3, 5, 8, 10, 13, 15, 18)) == (name != "wan"), (name, plan)
        for br in branches:
            assert len(s.branches[br]) == 20 and s.computed(br) == list(plan), str(s)
        # A skipped call runs no block body: block bodies ran 8/20 as often as in the full run.
        assert all(counts[k] * 20 == full_counts[k] * 8 for k in full_counts), (counts, full_counts)
        assert torch.isfinite(out).all() and out.shape == base20.shape
        # Close to the full run: with random weights the flow-matching trajectories are
        # smooth enough that the slow preset lands within ~1% (measured: wan 0.012, flux
        # 0.004, sd3 0.007 relative L2); 5% leaves room across platforms. The tiny random
        # DiT under DDIM is not smooth (plain reuse is 37% off as well), so it is exempt.
        if CLOSE[name] is not None:
            rel = ((out - base20).norm() / base20.norm()).item()
            assert rel < CLOSE[name], rel
        # Same inputs, same seed: a repeated call gives identical results (state was reset).
        assert torch.equal(generate(20), out)
        # T = 50: the slow preset computes 20 of 50 calls per branch.
        generate(50)
        assert all(len(tcpade.summary(pipe).computed(br)) == 20 for br in branches)
        # A different step count on the next call just works.
        generate(12)
        s12 = tcpade.summary(pipe)
        for br in branches:
            assert [r.k for r in s12.branches[br]] == list(range(12))
            # 5 of 12 (2.4x), the spaced rule on the run's times
            assert s12.computed(br) == list(TCPadeConfig.slow().plan(12, [float(t) for t in pipe.scheduler.timesteps]))
            assert len(s12.computed(br)) == 5
        with pytest.raises(RuntimeError, match="already applied"):
            tcpade.apply(pipe, TCPadeConfig.fast())
    finally:
        tcpade.remove(pipe)
        counter.remove()
    assert torch.equal(generate(20), base20)


@torch.no_grad()
def test_transformer_target_needs_steps_and_works_with_them():
    pipe, generate = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe.transformer, rule_fast(), num_steps=20)
    try:
        generate(20)
        s = tcpade.summary(pipe.transformer)
        assert len(s.computed("cond")) == 7 and len(s.computed("uncond")) == 7
    finally:
        tcpade.remove(pipe.transformer)


@torch.no_grad()
def test_resolution_and_batch_change_between_calls():
    """Each call may change resolution or batch: the history reallocates and starts over."""
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = generate(20, size=32, images=2)
    rt = tcpade.apply(pipe, rule_slow())
    try:
        for size, images in [(16, 1), (32, 2), (16, 1)]:
            out = generate(20, size=size, images=images)
            assert torch.isfinite(out).all()
            hist = rt.branches["cond"].history
            assert hist.ring.shape[1:3] == (images, (size // 2) ** 2)  # 2x2-packed latent tokens
            assert tcpade.summary(pipe).computed("uncond") == [0, 1, 2, 3, 4, 8, 12, 16, 19]
        assert (out - generate(20, size=16, images=1)).abs().max() == 0  # repeatable after the changes
    finally:
        tcpade.remove(pipe)
    assert torch.equal(generate(20, size=32, images=2), base)


@torch.no_grad()
def test_error_policy_in_a_pipeline():
    """The default config (rational predictor, error policy): skips only where the measured
    error allows. Random weights make the trajectory rough, so a loose tolerance is needed
    to see skips here; a strict one computes everything."""
    pipe, generate = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = generate(20)
    counts = []
    for tol in (1e-4, 0.3):
        tcpade.apply(pipe, TCPadeConfig(tolerance=tol))
        try:
            out = generate(20)
            s = tcpade.summary(pipe)
        finally:
            tcpade.remove(pipe)
        assert torch.isfinite(out).all()
        counts.append(len(s.computed("cond")))
        errs = [r.error for r in s.branches["cond"] if r.computed and r.error == r.error]
        assert errs, "the error policy measures its predictor at computed steps"
    assert counts[0] == 20 and counts[1] < 20
    assert ((out - base).norm() / base.norm()).item() < 0.2


def test_unsupported_targets():
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        tcpade.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipeline"):
        tcpade.apply(object())
    with pytest.raises(RuntimeError, match="not applied"):
        tcpade.remove(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_nan_in_trajectory_shows_in_summary():
    """A NaN in the embedded tokens of step 6 (a skip of the fixed schedule): the schedule is
    kept (it reads nothing from the device), the summary reports the step."""
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = {"n": 0}

    def poison(module, args, output):  # NaN into the embedded image tokens of call 12 (step 6, cond)
        calls["n"] += 1
        if calls["n"] == 13:
            output = output.clone()
            output[0, 0, 0] = float("nan")
        return output

    handle = pipe.transformer.x_embedder.register_forward_hook(poison)
    tcpade.apply(pipe, rule_slow())
    try:
        generate(20)
        s = tcpade.summary(pipe)
        cond = s.branches["cond"]
        assert cond[6].nonfinite and not cond[6].computed
        assert s.computed("cond") == [0, 1, 2, 3, 4, 8, 12, 16, 19]
        assert "non-finite values at steps [6" in str(s) and "fixed schedule was kept" in str(s)
    finally:
        handle.remove()
        tcpade.remove(pipe)


@torch.no_grad()
def test_step_count_mismatch_is_warned_once_and_the_scheduler_wins():
    """num_steps=20 given for a pipeline that runs 8 steps: one warning naming both, and the run's
    real length (the scheduler's) places the final step."""
    import warnings

    pipe, generate = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe, rule_slow(), num_steps=20)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(8)
            generate(8)
        msgs = [w for w in caught if "tcpade" in str(w.message)]
        assert len(msgs) == 1 and "num_steps=20" in str(msgs[0].message) and "8 steps" in str(msgs[0].message)
        assert msgs[0].filename == __file__
        assert tcpade.summary(pipe).computed("cond") == [0, 1, 2, 3, 4, 7]
    finally:
        tcpade.remove(pipe)


@torch.no_grad()
def test_bare_transformer_step_count_warnings_point_at_the_caller():
    """A bare transformer: without num_steps every call is computed, with one warning at the
    caller's line; num_steps=20 and an 8-step run: one warning with both numbers at the end of
    the run (the pipeline resets the hooks)."""
    import warnings

    model, inputs, _ = FAMILIES["dit"]()
    tcpade.apply(model, rule_slow())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(3):
                model(**inputs(k), return_dict=False)
        msgs = [w for w in caught if "tcpade" in str(w.message)]
        assert len(msgs) == 1 and "number of denoising steps is unknown" in str(msgs[0].message)
        assert msgs[0].filename == __file__
    finally:
        tcpade.remove(model)
    pipe, generate = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe.transformer, rule_slow(), num_steps=20)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(8)
        msgs = [w for w in caught if "tcpade" in str(w.message)]
        assert len(msgs) == 1, [str(m.message) for m in msgs]
        assert "8 steps" in str(msgs[0].message) and "num_steps=20" in str(msgs[0].message)
        assert msgs[0].filename == __file__
    finally:
        tcpade.remove(pipe.transformer)


@pytest.fixture
def registry():
    schedules.clear(shipped=False)
    yield
    schedules.clear()


@torch.no_grad()
def test_apply_keeps_the_users_config_and_resolves_beside_it(registry):
    """tcpade.apply neither changes nor replaces the config: ``runtime.config`` is the object
    given, field for field what it was; what calibration resolves for the model (the calibrated
    schedule for T and the predictor it was calibrated for) is ``runtime.resolved``, and the
    summary shows both."""
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    key = schedules.model_key(pipe.transformer)
    schedules.register(key, "rational", 8, {4: (0, 1, 2, 6)}, psnr={4: 30.0})
    schedules.register(key, "reuse", 8, {4: (0, 2, 4, 6)}, psnr={4: 33.0})  # scores best
    cfg = TCPadeConfig.budget(passes=4, calibrated_predictor=True)
    before = copy.deepcopy(cfg)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    rt = tcpade.apply(pipe, cfg)
    try:
        generate(8)
        assert rt.config is cfg and rt.resolved.config is cfg
        assert rt.resolved.predictors == ("rational", "reuse")
        assert rt.resolved.calibrated == ((8, (0, 2, 4, 6), "reuse"),) and rt.resolved.predictor_for(8) == "reuse"
        assert rt.resolved.plan(8) == (0, 2, 4, 6) and rt.resolved.plan_source(8) == "calibrated"
        s = tcpade.summary(pipe)
        assert s.config is cfg and s.resolved is rt.resolved
        assert s.computed("cond") == s.computed("uncond") == [0, 2, 4, 6]
        text = str(s)
        assert text.startswith("tcpade: predictor=reuse on the calibrated schedules made for it, rational (the config's) "
                               "on the others budget=passes 4;"), text  # fmt: skip
        assert "schedule: calibrated [0, 2, 4, 6] (unvalidated: no held-out check); predictor reuse" in text
    finally:
        tcpade.remove(pipe)
    # the config alone: its own predictor, no model, the spaced rule
    assert cfg == before and {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == fields
    assert cfg.predictor == "rational" and cfg.plan(8) == schedules.spaced(8, 4)
