"""Retroactive correction of skipped steps (a measurement study, no library change).

At a computed step k that follows skipped steps j (k' < j < k, k' the previous computed step),
the model outputs at k' and k (and k'' before k') bracket the skipped steps: their values there can
be *interpolated* instead of extrapolated. The latent x_k already carries the error of the skipped
steps' predicted outputs m_j; with a scheduler update linear in the model output,
x_{i+1} = a_i x_i + b_i m_i, that error is sum_j (prod_{i=j+1}^{k-1} a_i) b_j (m_j - m~_j), and
x_k is corrected by it before the scheduler's step at k (the same as adding a_k^-1 ... to m_k:
the model is not called again). Flow matching Euler: a = 1, b = sigma_{i+1} - sigma_i; DDIM
(eta 0, epsilon): a = sqrt(ab_prev / ab_t), b = sqrt(1 - ab_prev) - sqrt(ab_prev (1 - ab_t) / ab_t).

Usage (repository root, PYTHONPATH=bench:bench/research): run.py MODELS STEPS PRESETS VARIANTS OUT.csv
  variants: lin:<axis> | quad:<axis> (axis: time = sigma (flow) / timestep (DDIM); index)
"""
from __future__ import annotations

import math
import sys

import torch
from preset_grid import grid


def coefficients(sched):
    """(a_i, b_i, axis time_i) per step of a scheduler after set_timesteps."""
    T = len(sched.timesteps)
    if hasattr(sched, "sigmas") and type(sched).__name__.startswith("FlowMatch"):
        s = [float(v) for v in sched.sigmas]
        return [1.0] * T, [s[i + 1] - s[i] for i in range(T)], s[:T]
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    a, b = [], []
    for t in ts:
        p = t - step
        ab_t = float(ac[t])
        ab_p = float(ac[p]) if p >= 0 else float(sched.final_alpha_cumprod)
        a.append(math.sqrt(ab_p / ab_t))
        b.append(math.sqrt(1 - ab_p) - math.sqrt(ab_p * (1 - ab_t) / ab_t))
    return a, b, [float(t) for t in ts]


def interp_weights(xs, x):
    """Lagrange weights at x through the points xs."""
    w = []
    for i, xi in enumerate(xs):
        v = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                v *= (x - xj) / (xi - xj)
        w.append(v)
    return w


def wrap(sched, computed, variant):
    kind, axis = variant.split(":")
    orig = sched.step
    st = {"i": 0, "m": {}, "coef": None}

    def step(model_output, timestep, sample, *args, **kwargs):
        i = st["i"]
        st["i"] += 1
        if st["coef"] is None:
            st["coef"] = coefficients(sched)
        a, b, tt = st["coef"]
        st["m"][i] = model_output.double()
        if i in computed and kind != "none":
            cs = sorted(c for c in computed if c < i)
            if cs and cs[-1] < i - 1:
                kp = cs[-1]
                pts = [kp, i] if kind == "lin" or len(cs) < 2 else [cs[-2], kp, i]
                ax = (lambda k: tt[k]) if axis == "time" else (lambda k: float(k))
                delta = torch.zeros_like(st["m"][i])
                for j in range(kp + 1, i):
                    w = interp_weights([ax(p) for p in pts], ax(j))
                    mt = sum(wi * st["m"][p] for wi, p in zip(w, pts))
                    prop = 1.0
                    for q in range(j + 1, i):
                        prop *= a[q]
                    delta += prop * b[j] * (mt - st["m"][j])
                sample = (sample.double() + delta).to(sample.dtype)
        return orig(model_output, timestep, sample, *args, **kwargs)

    sched.step = step
    return sched


def run_variant(model, T, computed, variant, cfg, seeds, labels):
    """The preset's run with the zoo scheduler's ``step`` wrapped to apply the correction."""
    make = model.noise_scheduler
    model.noise_scheduler = lambda: wrap(make(), computed, variant)
    try:
        return model.sample(seeds, labels, steps=T, config=cfg)
    finally:
        del model.noise_scheduler


if __name__ == "__main__":
    grid(sys.argv[1:], "base_psnr", run_variant)
