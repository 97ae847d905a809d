"""Skipped steps predicted in the denoised-estimate (x0) space at the transformer's output
(a measurement study, no library change).

On a computed step the transformer runs and its output m is stored with its input latent x; on a
skipped step of the same computed-step set as a preset's run, the output is predicted from the
stored ones. The variants differ in *what* is extrapolated:

* ``v:<rule>``: the output itself (what tcpade's ``level="output"`` and TaylorSeer's whole-block
  mode extrapolate; a control);
* ``x0:<rule>``: the denoised estimate x0 = x - sigma m (flow matching: x = (1 - sigma) x0 + sigma e,
  m = e - x0) or x0 = (x - sqrt(1 - ab) m) / sqrt(ab) (DDIM, m = e), extrapolated, then turned back
  into an output *at the skipped step's own latent x_j*: m_j = (x_j - x0_j) / sigma_j, or
  (x_j - sqrt(ab_j) x0_j) / sqrt(1 - ab_j). The prediction therefore answers the latent's own
  error the way the model does (the diagnostic of bench/research/retro_correction).

rule: ``reuse`` (the newest), ``lin:index`` / ``lin:time`` (through the two newest computed steps, on
the step index or on sigma / DDIM's timestep), ``damp:<c>`` (newest + c x the linear step on the
index). DiT's learned-variance channels are extrapolated as outputs (the sampler ignores them).

Usage (repository root, PYTHONPATH=bench:bench/research): run.py MODELS STEPS PRESETS VARIANTS OUT.csv (PRESETS ';'-separated, from bench/quality.py)
"""
from __future__ import annotations

import math
import sys

import torch
from preset_grid import grid


class OutputEmulator:
    def __init__(self, model, steps, computed, variant):
        self.model, self.T, self.computed, self.variant = model, steps, frozenset(computed), variant
        self.nb = 2 if model.spec.guidance_scale != 1 else 1
        sched = model.noise_scheduler()
        sched.set_timesteps(steps)
        self.flow = type(sched).__name__.startswith("FlowMatch")
        if self.flow:
            self.sig = [float(s) for s in sched.sigmas[:steps]]
            self.axis = self.sig
        else:
            ac = sched.alphas_cumprod.double()
            ts = [int(t) for t in sched.timesteps]
            self.a = [math.sqrt(float(ac[t])) for t in ts]
            self.s = [math.sqrt(1 - float(ac[t])) for t in ts]
            self.axis = [float(t) for t in ts]
        self.calls = 0
        self.hist = {}
        tr = model.transformer
        self.orig = tr.forward
        tr.forward = self.forward

    def close(self):
        del self.model.transformer.forward

    def to_space(self, k, x, m):
        """(x0 or output) of a computed call, in the variant's space (the eps part only)."""
        c = x.shape[1] if not self.flow else None
        eps, rest = (m[:, :c], m[:, c:]) if c is not None and m.shape[1] == 2 * c else (m, None)
        if self.variant.startswith("v:"):
            return eps, rest
        if self.flow:
            return x - self.sig[k] * eps, rest
        return (x - self.s[k] * eps) / self.a[k], rest

    def from_space(self, k, x, z, rest):
        if self.variant.startswith("v:"):
            eps = z
        elif self.flow:
            eps = (x - z) / self.sig[k]
        else:
            eps = (x - self.a[k] * z) / self.s[k]
        return eps if rest is None else torch.cat([eps, rest], 1)

    def forward(self, *args, **kwargs):
        k, b = divmod(self.calls, self.nb)
        self.calls += 1
        x = kwargs["hidden_states"].double()
        h = self.hist.setdefault(b, [])
        if k in self.computed or not h:
            out = self.orig(*args, **kwargs)
            m = (out[0] if isinstance(out, (tuple, list)) else out.sample).double()
            z, rest = self.to_space(k, x, m)
            h.insert(0, (k, z, rest))
            del h[3:]
            return out
        rule = self.variant.split(":", 1)[1]
        k1, z1, r1 = h[0]
        if rule == "reuse" or len(h) < 2:
            z, rest = z1, r1
        else:
            k2, z2, r2 = h[1]
            if rule.startswith("damp:"):
                c = float(rule.split(":")[1]) * (k - k1) / (k1 - k2)
            elif rule == "lin:index":
                c = (k - k1) / (k1 - k2)
            elif rule == "lin:time":
                c = (self.axis[k] - self.axis[k1]) / (self.axis[k1] - self.axis[k2])
            else:
                raise ValueError(rule)
            z = z1 + c * (z1 - z2)
            rest = None if r1 is None else r1 + c * (r1 - r2)
        m = self.from_space(k, x, z, rest).to(kwargs["hidden_states"].dtype)
        return (m,)


def run_variant(model, T, computed, variant, cfg, seeds, labels):
    """The same computed steps emulated at the transformer's output (the library not attached)."""
    emu = OutputEmulator(model, T, computed, variant)
    try:
        img = model.sample(seeds, labels, steps=T)
    finally:
        emu.close()
    assert emu.calls == T * emu.nb
    return img


if __name__ == "__main__":
    grid(sys.argv[1:], "lib_psnr", run_variant)
