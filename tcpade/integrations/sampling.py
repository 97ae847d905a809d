"""``tcpade.sample``: a plain denoising loop around a supported transformer, with or without tcpade.

Use it when there is no diffusers pipeline to hook (a research loop, a custom scheduler
setup, a transformer loaded on its own), or to compare a full run with a cached one on the
same inputs:

    import torch, tcpade
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise = torch.randn(1, 16, 21, 60, 104, generator=torch.Generator().manual_seed(0))
    latents, stats = tcpade.sample(
        wan_transformer, FlowMatchEulerDiscreteScheduler(shift=5.0), noise,
        cond={"encoder_hidden_states": prompt_embeds},
        uncond={"encoder_hidden_states": negative_prompt_embeds}, guidance_scale=5.0,
        steps=20, config=tcpade.TCPadeConfig.slow(), return_summary=True,
    )
    print(stats)  # per CFG branch: 9/20 computed, which steps were skipped and why

    # FLUX takes packed latents (B, tokens, 64) and t / 1000, and a resolution-dependent shift:
    latents = tcpade.sample(flux_transformer, flux_scheduler, packed_noise,
                            cond=dict(encoder_hidden_states=pe, pooled_projections=pp, img_ids=img_ids,
                                      txt_ids=txt_ids, guidance=guidance),
                            timestep_scale=1e-3, set_timesteps_kwargs=dict(sigmas=sigmas, mu=mu), steps=28)

The loop is the one diffusers' pipelines run, with their conventions, so that with
``config=None`` it reproduces a pipeline's latents for the same inputs:

* ``latents`` is the initial noise in the transformer's input layout; it is multiplied by the
  scheduler's ``init_noise_sigma`` (1 for DDIM, DPM-Solver, flow matching).
* ``noise_scheduler.set_timesteps(steps, device=latents.device, **set_timesteps_kwargs)``;
  with ``sigmas`` or ``timesteps`` in ``set_timesteps_kwargs`` (their length must be ``steps``)
  ``num_inference_steps`` is not passed, as in diffusers' ``retrieve_timesteps``.
* per scheduler timestep t: ``scale_model_input`` if the scheduler has one; the transformer is
  called as ``transformer(hidden_states=x, timestep=t * timestep_scale expanded to the batch,
  **cond, return_dict=False)[0]`` (the input cast to the transformer's dtype); with ``uncond``
  and ``guidance_scale != 1`` a second call with ``**uncond``, combined as
  ``uncond + guidance_scale * (cond - uncond)`` (classifier-free guidance as separate calls, the
  way FLUX / Wan pipelines do it; batch the branches yourself into ``cond`` for one call). The
  calls run inside the cache context "cond" / "uncond" (``tcpade.integrations.adapters.cache_context``, which
  also works for DiT / SD3), so tcpade keeps one residual history per branch.
* a model output with twice the latent channels (dim 1) is a learned-sigma model (DiT): the
  first half is the prediction.
* ``noise_scheduler.step(pred, t, latents, return_dict=False)[0]`` (with ``generator=`` when the
  scheduler's ``step`` takes one, for stochastic samplers).

A ``timestep_scale`` whose reciprocal is a whole number (FLUX's 1e-3) divides by that number,
as the pipelines do (``t / 1000``), so the result matches them bit for bit. With
``timestep_scale == 1`` the scheduler's timestep is passed in its own dtype (DDIM: int64).

Step statistics: ``return_summary=True`` returns ``(latents, summary)``, where ``summary`` is the
``tcpade.Summary`` of this run restricted to its branches ("cond", and "uncond" with CFG), or
None when tcpade was not used (``config=None`` and not applied). We chose an explicit return
value over module state (a ``last_summary()``) because it is thread-safe and cannot go stale:
when ``sample`` applies tcpade itself it removes it again on exit, and the summary is taken
before that. When tcpade was applied beforehand, ``tcpade.summary(transformer)`` still shows the
run afterwards, as after a pipeline call.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import sys
import warnings
from typing import Optional

import torch

from ..policy.config import TCPadeConfig
from . import api
from .progress import Progress

__all__ = ["sample"]

_RESERVED = ("hidden_states", "timestep", "return_dict")


def _check_args(transformer, noise_scheduler, latents, cond, uncond, steps, config, guidance_scale,
                timestep_scale, set_timesteps_kwargs):  # fmt: skip
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"tcpade.sample: steps must be an int, got {type(steps).__name__}")
    if steps <= 0:
        raise ValueError(f"tcpade.sample: steps must be > 0, got {steps}")
    for name, value in (("guidance_scale", guidance_scale), ("timestep_scale", timestep_scale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"tcpade.sample: {name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"tcpade.sample: {name} must be finite, got {value!r}")
    if timestep_scale == 0:
        raise ValueError("tcpade.sample: timestep_scale must be non-zero")
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"tcpade.sample: latents must be a torch.Tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"tcpade.sample: latents must be a floating-point tensor, got {latents.dtype}")
    if latents.ndim < 2:
        raise ValueError(f"tcpade.sample: latents must be batched (at least 2 dims), got shape {tuple(latents.shape)}")
    for name, kw in (("cond", cond), ("uncond", uncond), ("set_timesteps_kwargs", set_timesteps_kwargs)):
        if kw is None and name != "cond":
            continue
        if not isinstance(kw, dict):
            raise TypeError(f"tcpade.sample: {name} must be a dict, got {type(kw).__name__}")
        if name != "set_timesteps_kwargs":
            bad = [k for k in _RESERVED if k in kw]
            if bad:
                raise ValueError(f"tcpade.sample: {name} must not contain {bad}: sample passes them itself")
    if set_timesteps_kwargs and ("num_inference_steps" in set_timesteps_kwargs or "device" in set_timesteps_kwargs):
        raise ValueError("tcpade.sample: set_timesteps_kwargs must not contain num_inference_steps or device "
                         "(use steps; the device is latents.device)")  # fmt: skip
    if config is not None and not isinstance(config, TCPadeConfig):
        raise TypeError(f"tcpade.sample: config must be a TCPadeConfig or None, got {type(config).__name__}")
    for method in ("set_timesteps", "step"):
        if not callable(getattr(noise_scheduler, method, None)):
            raise TypeError(
                f"tcpade.sample: noise_scheduler must be a diffusers scheduler (with .{method}), "
                f"got {type(noise_scheduler).__name__}"
            )
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"tcpade.sample: transformer must be a diffusers transformer, got {type(transformer).__name__}")
    api._adapters().find_adapter(transformer)  # tcpade's TypeError for an unsupported model


def _set_timesteps(scheduler, steps: int, device, kwargs: dict) -> torch.Tensor:
    custom = [k for k in ("sigmas", "timesteps") if kwargs.get(k) is not None]
    if custom:
        for k in custom:
            if len(kwargs[k]) != steps:
                raise ValueError(
                    f"tcpade.sample: set_timesteps_kwargs[{k!r}] has {len(kwargs[k])} entries, steps is {steps}"
                )
        scheduler.set_timesteps(device=device, **kwargs)  # as diffusers' retrieve_timesteps
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
    timesteps = scheduler.timesteps
    if timesteps is None or len(timesteps) == 0:
        raise ValueError(f"tcpade.sample: {type(scheduler).__name__}.set_timesteps produced no timesteps")
    if callable(getattr(scheduler, "set_begin_index", None)):
        scheduler.set_begin_index(0)  # as the pipelines: no index lookup (host sync) per step
    return timesteps


class _LoopClock:
    """The time of the loop's current step (``index``), from the host copy of its schedule."""

    reads = 1  # the one copy of the schedule to the host

    def __init__(self, times):
        self.times, self.index = times, 0

    def __call__(self) -> float:
        return self.times[self.index]

    def run_times(self, total: int):
        """Every step's time (the spaced rule's axis), when the loop runs ``total`` steps."""
        return self.times if len(self.times) == total else None


def _batch_timestep(t, batch: int, scale: float, dtype: torch.dtype, device) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=device)
    elif t.ndim == 0:
        t = t[None].to(device)
    ts = t.expand(batch)
    if scale != 1.0:
        ts = ts.to(dtype)
        inv = 1.0 / scale
        ts = ts / inv if float(inv).is_integer() else ts * scale
    return ts


def _prediction(out, latents: torch.Tensor) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not torch.is_tensor(out) and hasattr(out, "sample"):
        out = out.sample
    if out.shape == latents.shape:
        return out
    c = latents.shape[1]
    if out.ndim == latents.ndim and out.shape[1] == 2 * c and out.shape[2:] == latents.shape[2:]:
        return out[:, :c]  # learned sigma (DiT): keep the noise prediction, as DiTPipeline does
    raise ValueError(
        f"tcpade.sample: the transformer returned shape {tuple(out.shape)} for latents of shape "
        f"{tuple(latents.shape)}; latents must be in the transformer's input layout"
    )


def _reset_hooks(module: torch.nn.Module) -> None:
    """What a pipeline does at the end of a call (maybe_free_model_hooks): reset the stateful hooks
    (tcpade's root hook ends the Runtime's run; diffusers' own caches clear their state)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


def _progress(iterable, enabled: bool):
    """The steps of ``iterable`` with tcpade's progress bar on stderr (drawn only on a terminal)."""
    bar = Progress(len(iterable), "tcpade.sample", enabled=None if enabled else False, stream=sys.stderr)
    try:
        for item in iterable:
            yield item
            bar.step()
    finally:
        bar.close()


def _run_summary(rt, branches) -> api.Summary:
    return api.Summary(rt.config, {n: list(rt.records(n)) for n in branches if n in rt.branches}, rt.nbytes,
                       rt.resolved, {n: b.run.times for n, b in rt.branches.items() if n in branches})  # fmt: skip


def sample(
    transformer,
    noise_scheduler,
    latents: torch.Tensor,
    cond: dict,
    *,
    steps: int = 20,
    config: Optional[TCPadeConfig] = None,
    uncond: Optional[dict] = None,
    guidance_scale: float = 1.0,
    timestep_scale: float = 1.0,
    set_timesteps_kwargs: Optional[dict] = None,
    progress: bool = True,
    generator: Optional[torch.Generator] = None,
    return_summary: bool = False,
):
    """Denoise ``latents`` with ``transformer`` and ``noise_scheduler`` for ``steps`` steps.

    transformer: a transformer tcpade supports (FLUX, Wan, DiT, SD3; else TypeError).
    noise_scheduler: a diffusers scheduler (flow matching, DDIM, DPM-Solver, ...); its timesteps
        are set here.
    latents: the initial noise, a floating tensor in the transformer's input layout.
    cond / uncond: keyword arguments of the transformer call per CFG branch (encoder_hidden_states,
        pooled_projections, img_ids, txt_ids, class_labels, ...). With ``uncond`` and
        ``guidance_scale != 1``: two calls per step, ``uncond + guidance_scale * (cond - uncond)``.
    config: a TCPadeConfig to apply tcpade for this call only (removed again on exit, also on
        an error). If tcpade is already applied to the transformer its runtime is used (for
        the scheduler's timestep count; its own step setting is restored on exit; a different
        ``config`` is ignored with a warning). None and not applied: every step is computed in full.
    timestep_scale: the transformer gets ``t * timestep_scale`` (FLUX: 1e-3).
    set_timesteps_kwargs: extra ``set_timesteps`` arguments (FLUX: ``sigmas``, ``mu``).
    progress: show a progress bar on stderr when it is a terminal.
    generator: passed to ``scheduler.step`` if it takes one.
    return_summary: return ``(latents, summary)``; summary is this run's ``tcpade.Summary`` (its
        branches "cond" / "uncond"), or None when tcpade was not used.

    Returns the denoised latents (same layout as ``latents``), or ``(latents, summary)``.
    """
    _check_args(transformer, noise_scheduler, latents, cond, uncond, steps, config, guidance_scale,
                timestep_scale, set_timesteps_kwargs)  # fmt: skip
    adapters = api._adapters()
    module = adapters._unwrap(transformer)
    cfg = uncond is not None and guidance_scale != 1.0
    if guidance_scale != 1.0 and uncond is None:
        warnings.warn("tcpade.sample: guidance_scale is ignored without uncond", stacklevel=2)
    branches = ("cond", "uncond") if cfg else ("cond",)

    timesteps = _set_timesteps(noise_scheduler, int(steps), latents.device, dict(set_timesteps_kwargs or {}))
    total = len(timesteps)

    rt, applied_here, prev_total = None, False, None
    if adapters.is_attached(transformer):
        try:
            rt = api.runtime(transformer)
        except RuntimeError:  # hooks attached through tcpade.integrations.adapters with a custom controller
            rt = None
        if rt is not None:
            if config is not None and config != rt.config:
                warnings.warn(
                    "tcpade.sample: tcpade is already applied to this transformer with a different config; "
                    "using the applied one (tcpade.remove(transformer) first to sample with `config`)",
                    stacklevel=2,
                )
            prev_total = rt.steps_override
            rt.set_steps(total)
    elif config is not None:
        rt = api.apply(transformer, config, num_steps=total)
        applied_here = True
    summary = None
    try:
        if not applied_here:
            _reset_hooks(module)  # start a fresh run in every branch (tcpade's and diffusers' own caches)

        use_context = adapters.is_attached(transformer) or hasattr(module, "cache_context") or hasattr(
            module, "_diffusers_hook")  # fmt: skip
        step_params = inspect.signature(noise_scheduler.step).parameters
        step_kw = {"generator": generator} if "generator" in step_params else {}
        model_dtype = getattr(module, "dtype", latents.dtype)
        sigmas = getattr(noise_scheduler, "sigmas", None)
        # Host copies, one read each per run: the loop's times and sigmas (the transformer's
        # timestep tensors are never read back).
        clock = _LoopClock([float(t) * float(timestep_scale) for t in timesteps.reshape(-1).tolist()])
        host_sigmas = sigmas.tolist() if torch.is_tensor(sigmas) and sigmas.ndim == 1 else None
        out_dtype = latents.dtype
        batch = latents.shape[0]

        def call(name, x, ts, kwargs, ctx):
            if not use_context:
                return _prediction(transformer(hidden_states=x, timestep=ts, **kwargs, return_dict=False), latents)
            with adapters.cache_context(transformer, name, **ctx):
                return _prediction(transformer(hidden_states=x, timestep=ts, **kwargs, return_dict=False), latents)

        with torch.no_grad(), (rt.clocked(clock) if rt is not None else contextlib.nullcontext()):
            init_sigma = getattr(noise_scheduler, "init_noise_sigma", 1.0)
            if not (isinstance(init_sigma, (int, float)) and init_sigma == 1.0):
                latents = latents * init_sigma
            for i, t in enumerate(_progress(timesteps, progress)):
                x = latents
                if callable(getattr(noise_scheduler, "scale_model_input", None)):
                    x = noise_scheduler.scale_model_input(x, t)
                if x.dtype != model_dtype:
                    x = x.to(model_dtype)
                ts = _batch_timestep(t, batch, float(timestep_scale), latents.dtype, latents.device)
                ctx = {"step_index": i, "num_inference_steps": total}
                if host_sigmas is not None and i < len(host_sigmas):
                    ctx["sigma"] = host_sigmas[i]
                clock.index = i
                pred = call("cond", x, ts, cond, ctx)
                if cfg:
                    pred_uncond = call("uncond", x, ts, uncond, ctx)
                    pred = pred_uncond + guidance_scale * (pred - pred_uncond)
                latents = noise_scheduler.step(pred, t, latents, return_dict=False, **step_kw)[0]
                if latents.dtype != out_dtype:
                    latents = latents.to(out_dtype)
        if rt is not None:
            summary = _run_summary(rt, branches)
    finally:
        if applied_here:
            api.remove(transformer)
        else:
            _reset_hooks(module)  # as a pipeline does at the end of its call; tcpade's records stay readable
            if rt is not None:
                rt.set_steps(prev_total)  # the runtime's own step setting (None: from its pipeline)
    return (latents, summary) if return_summary else latents
