"""tcpade.sample: our own denoising loop, on tiny random-weight diffusers models (no downloads).

1. With config=None it reproduces the diffusers pipelines' final latents: FLUX (flow matching,
   cond only, t/1000, sigmas + mu) and Wan (flow matching, CFG as two calls) bit for bit; DiT
   (DDIM, CFG with the null class, learned sigma) bit for bit against DiTPipeline with its
   batched cond+uncond call split into two calls, and to ~1e-4 against the plain batched
   pipeline (batch size changes the float rounding of the matmuls).
2. With TCPadeConfig.slow() at 20 steps each CFG branch computes 8 of 20 calls (the spaced
   rule: no calibrated schedule for a random model) and the block bodies run 8/20 as often;
   the outputs are finite.
3. A tcpade that sample applied is removed again (also on an error): the plain forward is
   bit-identical afterwards. One applied beforehand is used and kept.
4. DPMSolverMultistepScheduler runs; bad arguments raise errors naming the argument.
"""

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from helpers import BlockBodyCounter, rule_fast, rule_slow  # noqa: E402
from tcpade.tools.tiny import FAMILIES, TXT  # noqa: E402
from tcpade.tools.tiny import dit_pipeline as _dit_pipeline  # noqa: E402
from tcpade.tools.tiny import flux_pipeline as _flux_pipeline  # noqa: E402
from tcpade.tools.tiny import wan_pipeline as _wan_pipeline  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402
from tcpade.integrations import adapters  # noqa: E402


def _capture_calls(model):
    """Records the keyword arguments of every call of ``model`` (the pipelines call by keyword)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------- 1. equivalence
@torch.no_grad()
def test_flux_cond_only_matches_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe, _ = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    pe, pp = torch.randn(1, TXT, 32, generator=g), torch.randn(1, 32, generator=g)
    calls, handle = _capture_calls(pipe.transformer)
    steps = 4
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, height=16, width=16, num_inference_steps=steps,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    handle.remove()
    first = calls[0]
    assert len(calls) == steps and first["guidance"] is None
    cond = {k: first[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")}
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    c = sched.config
    mu = calculate_shift(first["hidden_states"].shape[1], c.get("base_image_seq_len", 256),
                         c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                         c.get("max_shift", 1.15))  # fmt: skip
    sigmas = np.linspace(1.0, 1 / steps, steps)
    out, summary = tcpade.sample(pipe.transformer, sched, first["hidden_states"], cond, steps=steps,
                                 timestep_scale=1e-3, set_timesteps_kwargs=dict(sigmas=sigmas, mu=mu),
                                 progress=False, return_summary=True)  # fmt: skip
    assert summary is None  # tcpade was not used
    assert torch.equal(out, ref), (out - ref).abs().max()


@torch.no_grad()
def test_wan_cfg_matches_pipeline():
    pipe, generate = _wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls, handle = _capture_calls(pipe.transformer)
    ref = generate(4)  # guidance_scale 5: cond and uncond calls
    handle.remove()
    cond, uncond = calls[0], calls[1]
    out = tcpade.sample(pipe.transformer, FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
                        cond["hidden_states"], {"encoder_hidden_states": cond["encoder_hidden_states"]},
                        uncond={"encoder_hidden_states": uncond["encoder_hidden_states"]}, guidance_scale=5.0,
                        steps=4, progress=True)  # fmt: skip
    assert torch.equal(out, ref), (out - ref).abs().max()


@torch.no_grad()
def test_dit_cfg_matches_pipeline():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    pipe, generate = _dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    decoded = []  # DiTPipeline has no latent output: read the latents it hands to the VAE
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (decoded.append(z.clone()), decode(z, *a, **k))[1]

    def split_forward(hidden_states, timestep=None, class_labels=None, **kw):
        # The pipeline's batched [cond; uncond] call as two calls, the way sample makes them.
        n = hidden_states.shape[0] // 2
        halves = [type(model).forward(model, hidden_states[s], timestep=timestep[s], class_labels=class_labels[s],
                                      **kw).sample for s in (slice(0, n), slice(n, None))]  # fmt: skip
        return Transformer2DModelOutput(sample=torch.cat(halves))

    steps = 4
    generate(steps)  # batched, as shipped
    model.forward = split_forward
    try:
        generate(steps)
    finally:
        del model.forward
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=model.dtype)
    out = tcpade.sample(model, DDIMScheduler.from_config(pipe.scheduler.config), noise,
                        {"class_labels": torch.tensor([1, 7])}, uncond={"class_labels": torch.tensor([1000, 1000])},
                        guidance_scale=4.0, steps=steps, progress=False)  # fmt: skip
    z = 1 / pipe.vae.config.scaling_factor * out  # as the pipeline scales before decoding
    assert torch.equal(z, decoded[1]), (z - decoded[1]).abs().max()
    assert torch.allclose(z, decoded[0], atol=1e-3, rtol=0), (z - decoded[0]).abs().max()
    assert not hasattr(model, "_diffusers_hook")  # no cache context needed without tcpade: no side effect


# ------------------------------------------------------------------------------ 2-3. tcpade applied
def _wan_problem():
    model, inputs, _ = FAMILIES["wan"]()
    a, b = inputs(0), inputs(1)
    return model, inputs, a["hidden_states"], {"encoder_hidden_states": a["encoder_hidden_states"]}, {
        "encoder_hidden_states": b["encoder_hidden_states"]}  # fmt: skip


@torch.no_grad()
def test_slow_preset_computes_8_of_20_per_branch_and_is_removed_after():
    model, inputs, noise, cond, uncond = _wan_problem()
    plain = model(**inputs(2), return_dict=False)[0]
    counter = BlockBodyCounter(model)
    model(**inputs(2), return_dict=False)
    per_call = counter.snapshot()
    counter.counts = dict.fromkeys(per_call, 0)
    try:
        sched = FlowMatchEulerDiscreteScheduler(shift=7.0)
        out, s = tcpade.sample(model, sched, noise, cond, uncond=uncond, guidance_scale=5.0, steps=20,
                               config=TCPadeConfig.slow(), progress=False, return_summary=True)  # fmt: skip
        counts = counter.snapshot()
    finally:
        counter.remove()
    assert isinstance(s, tcpade.Summary) and sorted(s.branches) == ["cond", "uncond"]
    # The spaced rule on the run's times (time_spacing 0.5): a shift-7 schedule moves fastest at its
    # end, so 8 of 20 computed steps crowd there, not the index rule's 0 3 5 8 10 13 15 18.
    times = [float(t) for t in sched.timesteps]
    expect = list(tcpade.schedules.spaced(20, 8, times=times, time_weight=0.5))
    assert expect == [0, 4, 7, 11, 13, 15, 17, 18] != list(tcpade.schedules.spaced(20, 8))
    for br in ("cond", "uncond"):
        assert len(s.branches[br]) == 20 and s.computed(br) == expect, str(s)
    assert "schedule: spaced rule on the run's times (time_spacing=0.5)" in str(s)
    # 2 branches x 8 computed calls: block bodies ran 8/20 as often as in a full 20-step CFG run.
    assert all(counts[k] == per_call[k] * 2 * 8 for k in per_call), (counts, per_call)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    # sample applied tcpade, so it took it off again: the model is exactly as before.
    assert not adapters.is_attached(model) and not hasattr(model, "_tcpade_runtime")
    assert not hasattr(model, "_diffusers_hook") and "forward" not in model.__dict__
    assert torch.equal(model(**inputs(2), return_dict=False)[0], plain)


@torch.no_grad()
def test_removed_after_an_error_too():
    model, inputs, _ = FAMILIES["dit"]()
    plain = model(**inputs(0), return_dict=False)[0]
    with pytest.raises(IndexError):  # class 5000 is outside the embedding table: the first call fails
        tcpade.sample(model, DDIMScheduler(), inputs(0)["hidden_states"], {"class_labels": torch.tensor([5000, 1])},
                      steps=4, config=TCPadeConfig.slow(), progress=False)  # fmt: skip
    assert not adapters.is_attached(model)
    assert torch.equal(model(**inputs(0), return_dict=False)[0], plain)


@torch.no_grad()
def test_existing_runtime_is_used_and_kept():
    model, inputs, _ = FAMILIES["flux"]()
    kw = inputs(0)
    noise = kw.pop("hidden_states")
    kw.pop("timestep")
    rt = tcpade.apply(model, rule_slow())  # no num_steps: sample sets them for its run only
    try:
        with pytest.warns(UserWarning, match="different config"):
            out, s = tcpade.sample(model, FlowMatchEulerDiscreteScheduler(), noise, kw, steps=12,
                                   config=rule_fast(), timestep_scale=1e-3, progress=False,
                                   return_summary=True)  # fmt: skip
        assert torch.isfinite(out).all()
        assert s.config == rule_slow() and list(s.branches) == ["cond"]
        assert s.computed("cond") == [0, 1, 2, 3, 4, 8, 11], str(s)
        assert adapters.is_attached(model) and tcpade.runtime(model) is rt
        assert rt.total_steps() is None  # the runtime's own setting is back
        assert tcpade.summary(model).computed("cond") == s.computed("cond")  # readable afterwards
        # The next run (another step count) starts a fresh run in the branch.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, s8 = tcpade.sample(model, FlowMatchEulerDiscreteScheduler(), noise, kw, steps=8, timestep_scale=1e-3,
                                  progress=False, return_summary=True)  # fmt: skip
        assert [r.k for r in s8.branches["cond"]] == list(range(8)) and s8.skipped("cond") == [5, 6]
    finally:
        tcpade.remove(model)


# ------------------------------------------------------------------------ 4. DPM-Solver, bad arguments
@torch.no_grad()
def test_dpm_solver_runs_and_matches_a_reference_loop():
    model, inputs, _ = FAMILIES["dit"]()
    noise = inputs(0)["hidden_states"]
    labels, null = torch.tensor([1, 7]), torch.tensor([1000, 1000])
    out = tcpade.sample(model, DPMSolverMultistepScheduler(), noise, {"class_labels": labels},
                        uncond={"class_labels": null}, guidance_scale=3.0, steps=6, progress=False)  # fmt: skip

    sched = DPMSolverMultistepScheduler()  # the loop of the diffusers docs, written out by hand
    sched.set_timesteps(6)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        ts = t[None].expand(2)
        c = model(sched.scale_model_input(x, t), timestep=ts, class_labels=labels).sample[:, :4]
        u = model(sched.scale_model_input(x, t), timestep=ts, class_labels=null).sample[:, :4]
        x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
    assert torch.equal(out, x), (out - x).abs().max()

    out2, s = tcpade.sample(model, DPMSolverMultistepScheduler(), noise, {"class_labels": labels},
                            uncond={"class_labels": null}, guidance_scale=3.0, steps=12,
                            config=rule_slow(), progress=False, return_summary=True)  # fmt: skip
    assert torch.isfinite(out2).all()
    for br in ("cond", "uncond"):
        assert s.computed(br) == [0, 1, 2, 3, 4, 8, 11], str(s)
    assert not adapters.is_attached(model)


def test_bad_arguments_raise_named_errors():
    model, inputs, _ = FAMILIES["dit"]()
    noise = inputs(0)["hidden_states"]
    cond = {"class_labels": torch.tensor([1, 7])}
    sched = DDIMScheduler()

    def call(**over):
        args = dict(transformer=model, noise_scheduler=sched, latents=noise, cond=cond)
        kw = {k: over.pop(k) for k in list(over) if k not in args}
        args.update(over)
        return tcpade.sample(args.pop("transformer"), args.pop("noise_scheduler"), args.pop("latents"),
                             args.pop("cond"), progress=False, **kw)  # fmt: skip

    for exc, match, over in [
        (ValueError, "steps", dict(steps=0)),
        (ValueError, "steps", dict(steps=-3)),
        (TypeError, "steps", dict(steps=2.5)),
        (ValueError, "guidance_scale", dict(guidance_scale=math.nan)),
        (ValueError, "guidance_scale", dict(guidance_scale=math.inf)),
        (TypeError, "guidance_scale", dict(guidance_scale="4")),
        (ValueError, "timestep_scale", dict(timestep_scale=0.0)),
        (TypeError, "latents", dict(latents=noise.long())),
        (TypeError, "latents", dict(latents=noise.numpy())),
        (TypeError, "cond", dict(cond=[torch.tensor([1, 7])])),
        (TypeError, "uncond", dict(uncond="null")),
        (ValueError, "cond", dict(cond={"timestep": torch.tensor([1])})),
        (TypeError, "config", dict(config="slow")),
        (TypeError, "noise_scheduler", dict(noise_scheduler=object())),
        (ValueError, "set_timesteps_kwargs", dict(set_timesteps_kwargs={"num_inference_steps": 3})),
        (TypeError, "FluxTransformer2DModel", dict(transformer=torch.nn.Linear(4, 4))),  # tcpade's own TypeError
    ]:
        with pytest.raises(exc, match=match):
            call(**over)
    assert not adapters.is_attached(model)
    with pytest.raises(ValueError, match="steps"):  # custom sigmas of another length
        tcpade.sample(model, FlowMatchEulerDiscreteScheduler(), noise, cond, steps=4,
                      set_timesteps_kwargs={"sigmas": [1.0, 0.5]}, progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="guidance_scale is ignored"):
        tcpade.sample(model, sched, noise, cond, steps=1, guidance_scale=3.0, progress=False)
