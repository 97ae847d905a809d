"""tcpade.calibrate: the schedule search on a trained zoo model, tiny pipelines and bare
transformers of every layout (FLUX's packed latents, Wan's video latents, DiT, SD3); the JSON
round trip; the command line.

Short runs (T = 4 to 7, one input) keep this to a few seconds: the search's cost grows
with T^2 (exact greedy) or about T (lazy), not with anything these tests would gain from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tcpade
from tcpade import metrics, schedules, zoo
from tcpade.policy.config import TCPadeConfig
from tcpade.tools import tiny
from tcpade.tools.tiny import FAMILY_PIPELINES as PIPELINES
from tcpade.tools.tiny import TINY, TXT, _embeds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is many times faster than several on a shared machine, where
    OpenMP threads spin-wait for busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def registry():
    schedules.clear(shipped=False)
    yield
    schedules.clear()


@pytest.fixture(scope="module")
def flux():
    return zoo.load("flux-digits")


@pytest.mark.parametrize("method", ["lazy", "greedy"])
def test_greedy_removal_returns_nested_schedules_with_the_requested_passes(flux, method):
    cal = tcpade.calibrate(flux, [(5, 3)], passes=3, steps=6, method=method, progress=False, holdout=False)
    assert cal.passes == 3 and len(cal.schedule()) == 3 and cal.schedule()[0] == 0
    assert sorted(cal.schedules) == list(range(3, 7))
    for p in range(3, 6):  # each pass count drops one step of the one above it
        assert set(cal.schedules[p]) < set(cal.schedules[p + 1]) and len(cal.schedules[p]) == p
    assert cal.curve()[0] == (6, metrics.PSNR_CAP)
    # cost: one full run, then (exact greedy) every candidate every round; lazy measures fewer
    if method == "greedy":
        assert cal.runs == 1 + 5 + 4 + 3
    else:
        assert 1 + 5 <= cal.runs <= 1 + 5 + 4 + 3


def test_refine_returns_the_requested_pass_counts_and_their_measured_psnr(flux):
    cal = tcpade.calibrate(flux, [(5, 3)], passes=[4, 3], steps=7, progress=False, holdout=False)
    assert cal.method == "refine" and cal.passes == 3 and sorted(cal.schedules) == [3, 4]
    ref = flux.sample([5], [3], steps=7)
    for p in (3, 4):
        assert len(cal.schedules[p]) == p and cal.schedules[p][0] == 0
        # the reported calibration PSNR is what the schedule gives when run again (deterministic),
        # and no worse than the spaced rule's, where the search starts
        out, summ = flux.sample([5], [3], steps=7, config=cal.config(p), return_summary=True)
        assert summ.computed("cond") == list(cal.schedules[p])
        assert float(metrics.psnr(out, ref).mean()) == pytest.approx(cal.psnr[p], abs=1e-9)
        spaced = flux.sample([5], [3], steps=7, config=TCPadeConfig.budget(passes=p, use_calibrated=False))
        assert cal.psnr[p] >= float(metrics.psnr(spaced, ref).mean())
    assert cal.model == schedules.model_key(flux.transformer) and cal.name == "flux-digits"
    assert cal.runs > 1 and cal.calls > 7


def test_speedup_and_bad_arguments(flux):
    cal = tcpade.calibrate(flux, [0], speedup=2.0, steps=4, progress=False, holdout=False)
    assert cal.passes == 2 and len(cal.schedule()) == 2 and cal.schedule()[0] == 0
    with pytest.raises(ValueError, match="exactly one"):
        tcpade.calibrate(flux, [0], steps=6)
    with pytest.raises(ValueError, match="passes"):
        tcpade.calibrate(flux, [0], passes=0, steps=6)
    with pytest.raises(ValueError, match="method"):
        tcpade.calibrate(flux, [0], passes=3, steps=6, method="dp")
    with pytest.raises(ValueError, match="sequence of ints"):
        tcpade.calibrate(flux, [0], passes=[3, 2.5], steps=6)
    with pytest.raises(ValueError, match="start"):
        tcpade.calibrate(flux, [0], passes=3, steps=6, method="lazy", start=(1, 2, 3), holdout=False)
    with pytest.raises(ValueError, match="at least one"):
        tcpade.calibrate(flux, [], passes=3, steps=6)
    with pytest.raises(TypeError, match="zoo model, a diffusers pipeline or a transformer"):
        tcpade.calibrate(object(), [0], passes=3, steps=6, holdout=False)
    # pass counts outside [lead, steps] are refused, not clamped to a trivial all-steps schedule
    with pytest.raises(ValueError, match=r"passes must be in \[1, 6\].*got \[7\]"):
        tcpade.calibrate(flux, [0], passes=7, steps=6)
    with pytest.raises(ValueError, match=r"passes must be in \[1, 6\].*got \[9\]"):
        tcpade.calibrate(flux, [0], passes=[4, 9], steps=6)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        tcpade.calibrate(flux, [0], speedup=1.0, steps=0)


def test_save_load_round_trip_reproduces_the_decisions(flux, tmp_path, registry):
    cal = tcpade.calibrate(flux, [(1, 2)], passes=[4, 3], steps=6, progress=False, holdout=False)
    path = tmp_path / "s.json"
    cal.save(str(path))
    doc = json.loads(path.read_text())
    assert doc["format"] == "tcpade-schedules" and doc["entries"][0]["model"] == cal.model
    # merge: another T for the same model is added, the same T replaced
    cal5 = tcpade.calibrate.Calibration(model=cal.model, predictor="rational", steps=5, schedules={3: (0, 1, 3)},
                                        psnr={3: 30.0}, passes=3)  # fmt: skip
    tcpade.calibrate.save(str(path), cal5, cal)
    assert sorted(e["steps"] for e in json.loads(path.read_text())["entries"]) == [5, 6]

    schedules.clear(shipped=False)
    _, before = flux.sample([3], [1], steps=6, config=TCPadeConfig.budget(passes=3), return_summary=True)
    assert before.computed("cond") == list(schedules.spaced(6, 3)) and "spaced rule" in str(before)
    loaded6, loaded5 = sorted(tcpade.calibrate.load(str(path)), key=lambda c: -c.steps)
    assert loaded6.schedules == cal.schedules and loaded6.psnr == pytest.approx(cal.psnr, abs=1e-3)
    assert loaded5.schedules == cal5.schedules
    for T, c in ((6, cal), (5, cal5)):
        for p in c.schedules:
            _, summ = flux.sample([3], [1], steps=T, config=TCPadeConfig.budget(passes=p), return_summary=True)
            assert summ.computed("cond") == list(c.schedules[p]), (T, p)
            assert "schedule: calibrated" in str(summ)
    with pytest.raises(ValueError, match="tcpade schedules file"):
        (tmp_path / "bad.json").write_text("{}")
        tcpade.calibrate.load(str(tmp_path / "bad.json"))


def test_calibrate_pipeline_and_bare_transformer_with_cfg(registry):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny.transformer("dit"), vae=tiny.tiny_vae(8), scheduler=DDIMScheduler())
    inp = dict(class_labels=[1], seed=0, guidance_scale=1.0)
    cal = tcpade.calibrate(pipe, [inp], passes=3, steps=5, progress=False, holdout=False)
    assert len(cal.schedule()) == 3 and cal.extra["branches"] == 1
    assert not hasattr(pipe.transformer, "_tcpade_runtime")  # removed again after every run
    # decoded images are in [0, 1]: the PSNR's data range is 1, whatever the reference's range
    full = _call(pipe, inp, 5, None)
    assert float(metrics.psnr(_call(pipe, inp, 5, cal.config()), full, data_range=1.0).mean()) == pytest.approx(
        cal.psnr[3], abs=1e-9
    )

    # bare transformer, CFG as two calls: two branches, each with the schedule's passes
    tr = tiny.transformer("dit")
    g = torch.Generator().manual_seed(3)
    inp = dict(latents=torch.randn(1, 4, 8, 8, generator=g), cond=dict(class_labels=torch.tensor([2])),
               uncond=dict(class_labels=torch.tensor([9])), guidance_scale=3.0)  # fmt: skip
    cal = tcpade.calibrate(tr, [inp], passes=3, steps=5, noise_scheduler=DDIMScheduler(), progress=False, holdout=False)
    assert cal.extra["branches"] == 2 and len(cal.schedule()) == 3
    _, summ = tcpade.sample(tr, DDIMScheduler(), steps=5, config=cal.config(), return_summary=True, **inp)
    assert summ.computed("cond") == summ.computed("uncond") == list(cal.schedule())
    with pytest.raises(TypeError, match="noise_scheduler"):
        tcpade.calibrate(tr, [inp], passes=3, steps=5, holdout=False)


def _call(pipe, inp, steps, config):
    """One pipeline call of a calibration input (full computation with config None) -> float tensor."""
    kw = dict(inp)
    kw.setdefault("output_type", "pt")
    gen = torch.Generator().manual_seed(kw.pop("seed"))
    if config is not None:
        tcpade.apply(pipe, config)
    try:
        out = pipe(**kw, num_inference_steps=steps, generator=gen, return_dict=False)[0]
    finally:
        if config is not None:
            tcpade.remove(pipe)
    return torch.as_tensor(out).float()


def _schedulers():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    return {"flux": FlowMatchEulerDiscreteScheduler, "wan": FlowMatchEulerDiscreteScheduler,
            "sd3": FlowMatchEulerDiscreteScheduler, "dit": DDIMScheduler}  # fmt: skip


@pytest.mark.parametrize("family, ndim", [("flux", 3), ("wan", 5), ("dit", 4), ("sd3", 4)])
def test_calibrate_a_bare_transformer_in_its_own_layout(family, ndim, registry):
    """FLUX takes packed latents (N, tokens, C), Wan video latents (N, C, F, H, W), DiT and SD3
    (N, C, H, W): the search scores them all by PSNR over the full run's value range, and the
    number it reports is the one the schedule gives when run again."""
    t = TINY[family]()
    kw = t.inputs(0)
    latents = kw.pop("hidden_states")
    kw.pop("timestep")
    assert latents.ndim == ndim
    inp = dict(latents=latents, cond=kw, timestep_scale=t.timestep_scale)
    sched = _schedulers()[family]
    cal = tcpade.calibrate(t.model, [inp], passes=[4, 3], steps=6, noise_scheduler=sched(), progress=False,
                           holdout=False)  # fmt: skip
    assert sorted(cal.schedules) == [3, 4] and cal.schedules[3][0] == 0
    full = tcpade.sample(t.model, sched(), steps=6, progress=False, **inp)
    for p in (3, 4):
        out = tcpade.sample(t.model, sched(), steps=6, config=cal.config(p), progress=False, **inp)
        want = float(metrics.psnr(out, full, data_range=float(full.max() - full.min())).mean())
        assert cal.psnr[p] == pytest.approx(want, abs=1e-9) and 0 < cal.psnr[p] < metrics.PSNR_CAP
    assert metrics.has_ssim(full) == (ndim != 3)  # packed tokens have no image layout: PSNR only


def _latent_inputs(family):
    """Call kwargs of the tiny pipelines of tcpade.tools.tiny.FAMILY_PIPELINES (precomputed prompt embeddings)."""
    if family == "flux":  # true CFG off: one branch; the output: packed latents (1, tokens, C)
        pe, pp = _embeds(1, (1, TXT, 16), (1, 16))
        return dict(prompt_embeds=pe, pooled_prompt_embeds=pp, height=8, width=8)
    if family == "wan":  # CFG as cond / uncond calls; the output: video latents (1, C, F, H, W)
        pe, ne = _embeds(3, (1, TXT, 16), (1, TXT, 16))
        return dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=5, guidance_scale=5.0)
    pe, pp, ne, npp = _embeds(2, (1, TXT, 16), (1, 16), (1, TXT, 16), (1, 16))  # SD3: CFG batched, (1, C, H, W)
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                negative_pooled_prompt_embeds=npp, guidance_scale=3.0, height=8, width=8)  # fmt: skip


@pytest.mark.parametrize("family, ndim, branches", [("flux", 3, 1), ("wan", 5, 2), ("sd3", 4, 1)])
def test_calibrate_a_pipeline_on_its_latents(family, ndim, branches, registry):
    """``output_type="latent"``: the pipeline's latents in its own layout, PSNR over their range."""
    pipe, _ = PIPELINES[family]()
    inp = dict(_latent_inputs(family), output_type="latent", seed=0)
    cal = tcpade.calibrate(pipe, [inp], passes=3, steps=5, progress=False, holdout=False)
    assert len(cal.schedule()) == 3 and cal.extra["branches"] == branches
    full = _call(pipe, inp, 5, None)
    assert full.ndim == ndim
    out = _call(pipe, inp, 5, cal.config())
    want = float(metrics.psnr(out, full, data_range=float(full.max() - full.min())).mean())
    assert cal.psnr[3] == pytest.approx(want, abs=1e-9) and 0 < cal.psnr[3] < metrics.PSNR_CAP


def test_lead_is_one_fact():
    """The computed steps a schedule starts with: one table (plain Python, so the command line
    checks pass counts without importing torch), the same object wherever it is read."""
    from tcpade.core import coef, layout

    assert coef.MIN_HISTORY is layout.MIN_HISTORY
    assert set(layout.MIN_HISTORY) == set(layout.PREDICTORS)
    auto = max(layout.MIN_HISTORY[c] for c in layout.CHOOSERS["auto"])
    assert layout.MIN_HISTORY["reuse"] == 1 and layout.MIN_HISTORY["auto"] == auto
    assert not hasattr(schedules, "min_leading")


def test_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cal.json"
    proc = subprocess.run([sys.executable, "-m", "tcpade.tools.calibrate", "flux-digits", "--steps", "5",
                           "--passes", "4,3", "--seeds", "0,1", "--out", str(out), "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 passes" in proc.stdout and "RuntimeWarning" not in proc.stderr
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["name"] == "flux-digits" and entry["steps"] == 5 and entry["method"] == "refine"
    assert sorted(entry["schedules"]) == ["3", "4"] and len(entry["schedules"]["3"]) == 3
    # --holdout 0.5 (the default) of two seeds: one searched, one held out; every pass count checked
    assert entry["inputs"] == 1 and entry["validated"] and entry["validation"]["inputs"] == 1
    assert sorted(entry["validation"]["passes"]) == ["3", "4"]
    assert "validation on 1 held-out input(s)" in proc.stdout and "held-out" in proc.stdout.split("3 passes")[1]
    bad = subprocess.run([sys.executable, "-m", "tcpade.tools.calibrate", "no-such-model", "--passes", "3"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "neither a zoo model" in bad.stderr


def test_add_cli_registers_a_subcommand():
    import argparse

    from tcpade import calibrate as cal_module

    p = argparse.ArgumentParser()
    cal_module.add_cli(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["calibrate", "flux-digits", "--passes", "7", "--steps", "20"])
    assert args.func is cal_module.run_cli and args.passes == "7" and args.speedup is None
    from tcpade.tools.args import UsageError

    with pytest.raises(UsageError, match="--passes must be comma-separated integers, got '7,x'"):
        cal_module.run_cli(p.parse_args(["calibrate", "flux-digits", "--passes", "7,x"]))


def _cal(model, predictor, psnr, steps=6):
    reuse = predictor == "reuse"  # (reuse needs only step 0 computed before its first skip)
    sched = {3: (0, 2, 4) if reuse else (0, 1, 4), 4: (0, 2, 3, 5) if reuse else (0, 1, 3, 5)}
    return tcpade.calibrate.Calibration(model=model, predictor=predictor, steps=steps, schedules=sched,
                                        psnr={3: psnr[0], 4: psnr[1]}, passes=3)  # fmt: skip


def test_calibrated_predictor_takes_each_schedules_own_predictor(flux, registry):
    """``calibrated_predictor`` (set by slow() / fast()): at each (T, passes) the schedule of the
    predictor whose calibration beat the spaced rule on held-out inputs by the most (validated
    before unvalidated; unvalidated by calibration PSNR), run with that predictor; an explicit
    predictor keeps its own calibrations only."""
    key = schedules.model_key(flux.transformer)
    _cal(key, "rational", (30.0, 35.0)).register()
    assert schedules.best_schedules(flux.transformer) == ((6, (0, 1, 4), "rational"), (6, (0, 1, 3, 5), "rational"))
    _cal(key, "reuse", (33.0, 34.0)).register()  # unvalidated: by calibration PSNR, reuse at 3 passes
    _cal(key, "linear", (20.0, 40.0), steps=7).register()  # another T: its own
    assert schedules.best_schedules(flux.transformer) == (
        (6, (0, 2, 4), "reuse"), (6, (0, 1, 3, 5), "rational"), (7, (0, 1, 4), "linear"), (7, (0, 1, 3, 5), "linear"))
    # a validated schedule before an unvalidated one; among validated, the larger held-out margin
    lin = _cal(key, "linear", (10.0, 10.0))
    lin.validation, lin.holdout = {3: (31.0, 30.0), 4: (36.5, 36.0)}, 2
    lin.register()
    rat = _cal(key, "rational", (30.0, 35.0))
    rat.validation, rat.holdout = {3: (29.0, 30.0), 4: (37.0, 36.0)}, 2  # loses at 3 passes, +1.0 at 4
    rat.register()
    assert schedules.best_schedules(flux.transformer)[:2] == ((6, (0, 1, 4), "linear"), (6, (0, 1, 3, 5), "rational"))
    cfg = TCPadeConfig.budget(passes=3, calibrated_predictor=True)
    resolved = schedules.resolve(cfg, flux.transformer)
    assert resolved.predictors == ("rational", "linear")  # (reuse's schedules are outranked everywhere)
    assert resolved.plan(6) == (0, 1, 4) and resolved.predictor_for(6) == "linear"
    assert resolved.plan_note(6) == "held-out 31.00 dB, spaced rule 30.00 dB"
    assert resolved.plan(5) == schedules.spaced(5, 3) and resolved.predictor_for(5) == "rational"
    _, summ = flux.sample([3], [1], steps=6, config=cfg, return_summary=True)
    assert summ.computed("cond") == [0, 1, 4]
    assert str(summ).startswith("tcpade: predictor=linear on the calibrated schedules made for it, "
                                "rational (the config's) on the others")  # fmt: skip
    assert "; predictor linear" in str(summ)
    # slow() / fast(): "linear" on the spaced rule, each calibrated schedule's own predictor on it
    assert TCPadeConfig.fast().predictor == TCPadeConfig.slow().predictor == "linear"
    assert TCPadeConfig.fast().calibrated_predictor and TCPadeConfig.slow().calibrated_predictor
    assert not TCPadeConfig.fast(predictor="linear").calibrated_predictor  # the user's predictor stays
    only = schedules.resolve(TCPadeConfig.budget(passes=4, predictor="linear"), flux.transformer)
    assert only.predictors == ("linear",) and only.plan(6) == (0, 1, 3, 5) and only.plan_source(6) == "calibrated"
    assert schedules.resolve(TCPadeConfig.budget(passes=4), flux.transformer).predictor_for(6) == "rational"
    schedules.clear(shipped=False)
    assert schedules.best_schedules(flux.transformer) == ()


def test_calibrated_predictor_choice_survives_save_and_load(flux, registry, tmp_path):
    key = schedules.model_key(flux.transformer)
    path = str(tmp_path / "s.json")
    rat, lin = _cal(key, "rational", (30.0, 35.0)), _cal(key, "linear", (31.0, 36.0))
    rat.validation, rat.holdout = {3: (30.5, 30.0), 4: (36.0, 35.0)}, 2
    lin.validation, lin.holdout = {3: (31.0, 30.0), 4: (35.5, 35.0)}, 2
    tcpade.calibrate.save(path, rat, lin)
    tcpade.calibrate.load(path)
    assert schedules.best_schedules(flux.transformer) == ((6, (0, 1, 4), "linear"), (6, (0, 1, 3, 5), "rational"))


# ------------------------------------------------------------------------------ held-out validation
HELD = [(8, 1), (9, 2)]  # held-out inputs of the validation tests (seed, label)


@pytest.fixture(scope="module")
def checked(flux):
    """A calibration whose search must return, at 7 steps, (0, 2, 3, 4) for 4 passes (the start of
    a greedy removal: it predicts the last two steps from the first four, and loses to the
    spaced rule's (0, 2, 3, 5) by more than a dB) and the best removal from it for 3 passes (which
    beats the spaced rule's (0, 2, 5)), validated on two held-out inputs."""
    return tcpade.calibrate(flux, [(5, 3), (6, 4)], passes=3, steps=7, method="lazy", start=(0, 2, 3, 4),
                            holdout=HELD, progress=False)  # fmt: skip


def _held_psnr(flux, config):
    ref = flux.sample([s for s, _ in HELD], [c for _, c in HELD], steps=7)
    out = flux.sample([s for s, _ in HELD], [c for _, c in HELD], steps=7, config=config)
    return float(metrics.psnr(out, ref).mean())


def test_validation_measures_every_pass_count_on_the_held_out_inputs(flux, checked):
    cal = checked
    assert cal.inputs == 2 and cal.holdout == 2 and cal.validated
    assert sorted(cal.schedules) == sorted(cal.validation) == [3, 4] and cal.schedules[4] == (0, 2, 3, 4)
    for p in (3, 4):  # the numbers are the PSNRs of these runs, against full computation of the held-out inputs
        # (the spaced rule with the presets' predictor, what they run where no calibrated schedule is used)
        spaced = TCPadeConfig.budget(passes=p, use_calibrated=False, predictor=schedules.SPACED_PREDICTOR)
        assert cal.validation[p][1] == pytest.approx(_held_psnr(flux, spaced), abs=1e-9)
        searched = TCPadeConfig(schedule=cal.schedules[p], schedule_steps=7)
        assert cal.validation[p][0] == pytest.approx(_held_psnr(flux, searched), abs=1e-9)
    # the cost: one full run of the held-out inputs, then the spaced rule and the schedule per count
    assert cal.validation_runs == 1 + 2 * 2 and cal.runs > cal.validation_runs
    assert 0 < cal.validation_calls < cal.calls and 0 < cal.validation_seconds <= cal.seconds


def test_validation_refuses_a_schedule_that_loses_and_keeps_one_that_wins(flux, checked, registry):
    cal = checked
    spaced4 = TCPadeConfig.budget(passes=4, use_calibrated=False).plan(7)
    assert cal.validation[4][0] < cal.validation[4][1] - 1.0  # it loses on the held-out inputs
    assert not cal.used(4) and cal.verdict(4) == "spaced rule"
    assert cal.schedule(4) == spaced4 and cal.config(4).schedule == spaced4
    assert cal.validation[3][0] > cal.validation[3][1] + 1.0  # and this one wins
    assert cal.used(3) and cal.verdict(3) == "calibrated" and cal.schedule(3) == cal.schedules[3]
    cal.register()
    assert schedules.lookup(flux.transformer, "rational") == ((7, cal.schedules[3]),)
    for p, source, steps in ((4, "spaced rule", spaced4), (3, "calibrated", cal.schedules[3])):
        cfg = TCPadeConfig.budget(passes=p)
        resolved = schedules.resolve(cfg, flux.transformer)
        assert resolved.plan(7) == steps and resolved.plan_source(7) == source
        _, summ = flux.sample([3], [1], steps=7, config=cfg, return_summary=True)
        assert summ.computed("cond") == list(steps)
        c, sp = cal.validation[p]
        note = (f"held-out {c:.2f} dB, spaced rule {sp:.2f} dB" if source == "calibrated" else
                f"the calibrated schedule did not beat it on held-out inputs: {c:.2f} dB, spaced rule {sp:.2f} dB")  # fmt: skip
        assert f"schedule: {source} {list(steps)} ({note})" in str(summ)


def test_holdout_share_takes_the_last_inputs(flux, checked):
    cal = tcpade.calibrate(flux, [(5, 3), (6, 4), *HELD], passes=3, steps=7, method="lazy", start=(0, 2, 3, 4),
                           holdout=0.5, progress=False)  # fmt: skip
    assert cal.inputs == 2 and cal.holdout == 2
    assert cal.schedules == checked.schedules and sorted(cal.validation) == [3, 4]
    for p in (3, 4):
        assert cal.validation[p] == pytest.approx(checked.validation[p], abs=1e-9)


def test_bad_holdout_values_and_one_input(flux):
    with pytest.raises(ValueError, match="one calibration input leaves none to hold out.*holdout=False"):
        tcpade.calibrate(flux, [(5, 3)], passes=3, steps=6)
    for bad in (0, 1, 1.5, -0.2, float("nan"), True, "half", None, []):
        with pytest.raises(ValueError, match=r"holdout must be a share of the inputs in \(0, 1\), a non-empty list"):
            tcpade.calibrate(flux, [(5, 3), (6, 4)], passes=3, steps=6, holdout=bad)
    with pytest.raises(ValueError, match="is of model"):
        other = tcpade.calibrate.Calibration(model="Other:0", predictor="rational", steps=6, schedules={3: (0, 1, 4)},
                                             psnr={3: 30.0}, passes=3)  # fmt: skip
        tcpade.calibrate.validate(flux, other, HELD)
    with pytest.raises(ValueError, match="at least one held-out input"):
        tcpade.calibrate.validate(flux, other, [])


def test_unvalidated_calibration_is_used_and_marked(flux, registry):
    cal = tcpade.calibrate(flux, [(5, 3)], passes=3, steps=6, holdout=False, progress=False)
    assert not cal.validated and cal.validation == {} and cal.validation_runs == 0
    assert cal.verdict(3) == "unvalidated" and cal.used(3) and cal.schedule(3) == cal.schedules[3]
    e = cal.to_json()
    assert e["validated"] is False and "validation" not in e
    cal.register()
    _, summ = flux.sample([3], [1], steps=6, config=TCPadeConfig.budget(passes=3), return_summary=True)
    assert f"schedule: calibrated {list(cal.schedules[3])} (unvalidated: no held-out check)" in str(summ)


def test_validation_json_round_trip_and_version_1_files(flux, checked, tmp_path, registry):
    path = tmp_path / "s.json"
    checked.save(str(path))
    doc = json.loads(path.read_text())
    assert doc["version"] == schedules.FORMAT_VERSION == 2
    (entry,) = doc["entries"]
    assert entry["validated"] and entry["validation"]["inputs"] == 2
    assert entry["validation"]["passes"]["4"]["used"] is False and entry["validation"]["passes"]["3"]["used"] is True
    assert entry["schedules"]["4"] == [0, 2, 3, 4]  # the searched schedule is kept, marked not used
    (back,) = tcpade.calibrate.load(str(path))
    assert sorted(back.validation) == [3, 4] and back.holdout == 2
    assert all(back.validation[p] == pytest.approx(checked.validation[p], abs=1e-3) for p in (3, 4))
    assert back.validation_runs == checked.validation_runs and back.runs == checked.runs
    assert [back.verdict(p) for p in (3, 4)] == ["calibrated", "spaced rule"]
    assert schedules.lookup(flux.transformer, "rational") == ((7, checked.schedules[3]),)  # load registered it
    # a file written before the checks existed (version 1, no validation): loads, unvalidated, used
    schedules.clear(shipped=False)
    old = dict(entry)
    for k in ("validated", "validation"):
        old.pop(k)
    (path := tmp_path / "v1.json").write_text(json.dumps(dict(format="tcpade-schedules", version=1, entries=[old])))
    (v1,) = tcpade.calibrate.load(str(path))
    assert not v1.validated and v1.verdict(4) == "unvalidated" and v1.schedule(4) == (0, 2, 3, 4)
    assert set(schedules.lookup(flux.transformer, "rational")) == {(7, (0, 2, 3, 4)), (7, checked.schedules[3])}
    assert schedules.checks(flux.transformer, "rational") == ()
    (path := tmp_path / "v9.json").write_text(json.dumps(dict(format="tcpade-schedules", version=9, entries=[])))
    with pytest.raises(ValueError, match="version 9: this tcpade reads versions 1, 2"):
        tcpade.calibrate.load(str(path))


def test_validate_an_existing_calibration(flux, checked):
    """``validate`` checks a calibration (e.g. a shipped one) on other inputs; its cost replaces an
    earlier validation's in the totals."""
    again = tcpade.calibrate.validate(flux, checked, [(10, 5)], progress=False)
    assert again.holdout == 1 and sorted(again.validation) == [3, 4] and again.validation_runs == 5
    assert again.runs == checked.runs - checked.validation_runs + 5 and again.schedules == checked.schedules


def test_command_line_holdout_flags(tmp_path, capsys):
    from tcpade.tools.calibrate import main

    out = str(tmp_path / "c.json")
    for argv, msg in ((["--seeds", "0"], "--holdout: one seed leaves none to hold out"),
                      (["--seeds", "0,1", "--holdout", "1.5"], r"--holdout must be a share in \(0, 1\) or 'off'"),
                      (["--seeds", "0,1", "--holdout", "x"], r"--holdout must be a share in \(0, 1\) or 'off'"),
                      (["--holdout-seeds", "a"], "--holdout-seeds")):  # fmt: skip
        assert main(["flux-digits", "--steps", "5", "--passes", "3", "--out", out, *argv]) == 2
        assert re.search(msg, capsys.readouterr().err), (argv, msg)
    assert main(["flux-digits", "--steps", "5", "--passes", "3", "--seeds", "0", "--holdout", "off", "--out", out]) == 0
    assert "unvalidated" in capsys.readouterr().out
    (entry,) = json.loads(Path(out).read_text())["entries"]
    assert entry["validated"] is False and entry["inputs"] == 1
    argv = ["flux-digits", "--steps", "5", "--passes", "3", "--seeds", "0", "--holdout-seeds", "4,5", "--out", out]
    assert main(argv) == 0
    (entry,) = json.loads(Path(out).read_text())["entries"]
    assert entry["inputs"] == 1 and entry["validation"]["inputs"] == 2 and "3" in entry["validation"]["passes"]


def test_validation_of_a_bare_transformer_scores_over_the_held_out_range(registry):
    """A bare transformer's held-out check: PSNR over the held-out full computation's value range,
    with the calibration's scheduler and both CFG branches."""
    from diffusers import DDIMScheduler

    tr = tiny.transformer("dit")

    def inp(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(latents=torch.randn(1, 4, 8, 8, generator=g), cond=dict(class_labels=torch.tensor([seed % 10])),
                    uncond=dict(class_labels=torch.tensor([9])), guidance_scale=3.0)  # fmt: skip

    cal = tcpade.calibrate(tr, [inp(3)], passes=3, steps=5, noise_scheduler=DDIMScheduler(), progress=False,
                           holdout=[inp(7)])  # fmt: skip
    assert cal.inputs == 1 and cal.holdout == 1 and sorted(cal.validation) == [3] and cal.extra["branches"] == 2
    full = tcpade.sample(tr, DDIMScheduler(), steps=5, progress=False, **inp(7))
    rng = float(full.max() - full.min())
    for p in (3,):
        out = tcpade.sample(tr, DDIMScheduler(), steps=5, config=TCPadeConfig(schedule=cal.schedules[p],
                            schedule_steps=5), progress=False, **inp(7))  # fmt: skip
        spaced = tcpade.sample(tr, DDIMScheduler(), steps=5, progress=False, **inp(7),
                               config=TCPadeConfig.budget(passes=p, use_calibrated=False, predictor="linear"))
        assert cal.validation[p][0] == pytest.approx(float(metrics.psnr(out, full, data_range=rng).mean()), abs=1e-9)
        assert cal.validation[p][1] == pytest.approx(float(metrics.psnr(spaced, full, data_range=rng).mean()), abs=1e-9)
        assert cal.used(p) == (cal.validation[p][0] > cal.validation[p][1])


# ---------------------------------------------------------------------------------- trace search
def test_trace_search_inside_calibrate_keeps_its_run_budget(flux, registry):
    """``method="trace"``: one recorded full run, then at most ``runs`` sampling runs of the search
    inputs in all (the full run included; the held-out check comes on top, counted apart); every
    pass count asked for is found, valid, and never below the spaced rule on the search inputs."""
    cal = tcpade.calibrate(flux, [(5, 3), (6, 1), (7, 2)], passes=[5, 4], steps=10, method="trace", runs=9,
                           progress=False, holdout=[(8, 4)])  # fmt: skip
    assert cal.method == "trace" and sorted(cal.schedules) == [4, 5]
    assert cal.runs - cal.validation_runs <= 9 and cal.validation_runs > 0
    for k, sched in cal.schedules.items():
        assert len(sched) == k and schedules.check_schedule(sched, 10, "rational") == tuple(sched)
        spaced = TCPadeConfig.budget(passes=k, use_calibrated=False).plan(10)
        out = flux.sample([5, 6, 7], [3, 1, 2], steps=10, config=TCPadeConfig(schedule=spaced, schedule_steps=10))
        ref = flux.sample([5, 6, 7], [3, 1, 2], steps=10)
        assert cal.psnr[k] >= float(metrics.psnr(out, ref).mean()) - 1e-6  # (the spaced rule is measured first)
    with pytest.raises(ValueError, match="runs is the trace search's budget"):
        tcpade.calibrate(flux, [(5, 3)], passes=4, steps=10, runs=9, holdout=False, progress=False)
    with pytest.raises(ValueError, match="budget"):
        tcpade.calibrate(flux, [(5, 3)], passes=[5, 4], steps=10, method="trace", runs=2, holdout=False,
                         progress=False)  # fmt: skip


def test_the_spaced_rule_is_placed_on_the_pipelines_times_in_runs_and_checks(registry):
    """A pipeline with a shifted flow-matching scheduler (Wan, CFG as two calls): the budget's
    spaced rule runs on the run's times (the runtime reads them from the pipeline's scheduler), and
    calibrate's held-out check measures that same rule: its spaced-rule PSNR is the budget run's,
    and a pass count whose searched schedule lost gives the time-placed schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, _ = PIPELINES["wan"]()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    steps, k = 10, 4
    inp = dict(_latent_inputs("wan"), output_type="latent", seed=0)
    held = dict(inp, seed=1)
    cfg = TCPadeConfig.budget(passes=k, predictor="linear", use_calibrated=False)
    tcpade.apply(pipe, cfg)
    try:
        kw = dict(held)
        gen = torch.Generator().manual_seed(kw.pop("seed"))
        out = torch.as_tensor(pipe(**kw, num_inference_steps=steps, generator=gen, return_dict=False)[0]).float()
        summ = tcpade.summary(pipe)
    finally:
        tcpade.remove(pipe)
    times = [float(t) for t in pipe.scheduler.timesteps]
    placed = cfg.plan(steps, times)
    assert placed == schedules.spaced(steps, k, times=times, time_weight=0.5) != cfg.plan(steps)
    assert summ.computed("cond") == summ.computed("uncond") == list(placed), str(summ)
    assert "spaced rule on the run's times" in str(summ)

    cal = tcpade.calibrate(pipe, [inp], passes=[k], steps=steps, predictor="linear", progress=False, holdout=[held])
    full = _call(pipe, held, steps, None)
    rng = float(full.max() - full.min())
    assert cal.validation[k][1] == pytest.approx(float(metrics.psnr(out, full, data_range=rng).mean()), abs=1e-9)
    assert cal.extra["times"] == pytest.approx(times)
    expect = tuple(cal.schedules[k]) if cal.used(k) else placed
    assert cal.schedule(k) == expect


def test_the_checks_spaced_rule_is_what_the_presets_run():
    """The held-out check compares a calibrated schedule with what slow() / fast() would run in its
    place: on the run's times, at a pass count the presets use, with no more than 3 steps predicted
    in a row (fast's 3 of 10 at shift 3: 0 4 8, not 0 5 8); at a pass count too few to keep 3 in a
    row, what fast(passes=K) runs: the plain budget's placement (12 of 50: 5 in a row); without
    times, the rule on the step index."""
    from tcpade.tools.calibrate import _spaced_plan

    from diffusers import FlowMatchEulerDiscreteScheduler

    def times(T):
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(T)
        return [float(t) for t in s.timesteps]

    assert _spaced_plan("linear", 3, 10, {}, times(10)) == (0, 4, 8) == TCPadeConfig.fast().plan(10, times(10))
    assert TCPadeConfig.budget(passes=3, predictor="linear").plan(10, times(10)) == (0, 5, 8)
    plain = TCPadeConfig.budget(passes=12, predictor="linear").plan(50, times(50))
    check = _spaced_plan("linear", 12, 50, {}, times(50))
    assert check == TCPadeConfig.fast(passes=12).plan(50, times(50)) == plain and len(check) == 12
    assert schedules.longest_skip_run(plain, 50) == 5
    assert _spaced_plan("linear", 3, 10, {}, None) == schedules.spaced(10, 3)
