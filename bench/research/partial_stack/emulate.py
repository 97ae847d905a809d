"""Emulation of skipped steps on a zoo model, outside the library (measurement only).

``Emulator(model)`` wraps the ``forward`` of every block of the model's stack (the blocks
``tcpade.integrations.families`` names) in this process only; ``run(...)`` then samples with
``model.sample`` (config None: the library's hooks are not attached) and, per transformer call,
either runs every block (a computed step) or, on a skipped step, runs the first ``n_f`` and the
last ``n_b`` blocks and predicts the residual of the middle ones:

* computed step: the middle's input stream (image tokens, and the text stream for FLUX's blocks,
  which carry both) is kept at the entry of block ``n_f``; at the exit of block ``N - 1 - n_b``
  the middle residual ``R = out - in`` is stored in the branch's history (newest first, five kept);
* skipped step: blocks ``0 .. n_f - 1`` run; block ``n_f`` returns ``in + R_hat`` (image and text
  streams), the other middle blocks pass their input through (no forward, so no MACs are counted
  for them by ``bench/peers.py``'s ``count_macs``), blocks ``N - n_b .. N - 1`` run.

``n_f = n_b = 0`` is whole-stack skipping, what the library does (the text stream leaving the
stack is then never read). CFG's two calls per step are two branches with their own histories
(call index mod 2), as in the library. The call's time is its ``timestep`` argument as a float
(FLUX: sigma, DiT / Wan: the scheduler's timestep), the same times the library passes to its
coefficients.

Predictors (``predict(hist, k, t)``: hist = [(k_i, t_i, residual tensors)] newest first):

* ``ours:<variant>[:<axis>]``: the library's own coefficients (``tcpade.core.coef.build_coef``:
  rational, linear, reuse; stage from ``stage_of``) applied by its torch reference
  (``tcpade.core.reference.predict_math``) to the newest three residuals, in time ``axis``
  ("index", the library's default ``time_axis``: the step index; "sigma": the call's time);
* ``fit:<axis>:<anchor>:<m>:<deg>:<rho>``: a least-squares polynomial of degree ``deg`` through the
  newest ``m`` residuals in time ``axis`` ("index": the step index; "sigma": the call's time),
  with ridge shrinkage. ``anchor`` "a": the polynomial passes through R1 and the ridge shrinks its
  slope terms toward 0, so the prediction moves from the extrapolation (rho 0) toward reuse of R1
  (rho -> inf); "f": free intercept (plain least squares, rho shrinks only the slope terms).
  Times are scaled by the newest spacing (s = (x - x1) / (x1 - x2)); the ridge is
  lambda = rho * trace(X^T X) / deg. The prediction is a fixed linear combination of the stored
  residuals (weights from the times only, computed in float64 on the host).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from tcpade.core import coef as K
from tcpade.core import reference as REF
from tcpade.integrations import families

KEEP = 5  # residuals kept per branch


# -- predictors ---------------------------------------------------------------------------------------


def fit_weights(xs: Sequence[float], x_target: float, m: int, deg: int, rho: float, anchored: bool) -> List[float]:
    """Weights c_i (newest first) of the ridge polynomial prediction at ``x_target`` from samples at
    ``xs`` (newest first), using the newest ``m`` of them."""
    if m < 2 or deg < 1 or rho < 0:
        raise ValueError(f"fit: need m >= 2, deg >= 1, rho >= 0; got m={m}, deg={deg}, rho={rho}")
    n = min(m, len(xs))
    if n < 2:
        return [1.0]
    x1, x2 = float(xs[0]), float(xs[1])
    h = x1 - x2
    if not math.isfinite(h) or h == 0.0:
        return [1.0]
    s = np.array([(float(x) - x1) / h for x in xs[:n]])
    st = (float(x_target) - x1) / h
    if anchored:
        d = min(deg, n - 1)
        X = np.stack([s[1:] ** j for j in range(1, d + 1)], 1)  # rows: samples 2..n
        xt = np.array([st**j for j in range(1, d + 1)])
        G = X.T @ X
        lam = rho * np.trace(G) / d
        w = xt @ np.linalg.solve(G + lam * np.eye(d), X.T)  # weights on (R_i - R_1), i = 2..n
        return [1.0 - float(w.sum())] + [float(v) for v in w]
    d = min(deg, n - 1)
    X = np.stack([s**j for j in range(0, d + 1)], 1)
    xt = np.array([st**j for j in range(0, d + 1)])
    G = X.T @ X
    pen = np.eye(d + 1)
    pen[0, 0] = 0.0  # the intercept is not shrunk
    lam = rho * (np.trace(G) - G[0, 0]) / d
    w = xt @ np.linalg.solve(G + lam * pen, X.T)
    return [float(v) for v in w]


def parse_predictor(name: str, total: int) -> Callable:
    """A predictor function from its name (see the module docstring)."""
    parts = name.split(":")
    if parts[0] == "ours":
        variant = parts[1]
        axis = parts[2] if len(parts) > 2 else "index"
        K.check_variant(variant)
        if axis not in ("index", "sigma"):
            raise ValueError(f"bad time axis in {name!r}")

        def ours(hist, k, t, x):
            times = [float(e[0]) if axis == "index" else e[1] for e in hist[:3]]
            while len(times) < 3:
                times.append(math.nan)
            target = float(k) if axis == "index" else t
            cf = K.build_coef(variant, K.stage_of(k, total), times, target, min(len(hist), 3), 3)
            outs = []
            for j, xin in enumerate(x):
                rs = [e[2][j] for e in hist[:3]]
                while len(rs) < 3:
                    rs.append(torch.zeros_like(rs[0]))
                ring = torch.stack(rs)
                out, _ = REF.predict_math(xin, ring, [0, 1, 2], cf, None, variant, False, True)
                outs.append(out)
            return outs

        return ours
    if parts[0] == "fit":
        axis, anchor, m, deg, rho = parts[1], parts[2], int(parts[3]), int(parts[4]), float(parts[5])
        if axis not in ("index", "sigma") or anchor not in ("a", "f"):
            raise ValueError(f"bad fit predictor {name!r}")

        def fit(hist, k, t, x):
            xs = [e[0] if axis == "index" else e[1] for e in hist]
            c = fit_weights(xs, k if axis == "index" else t, m, deg, rho, anchor == "a")
            outs = []
            for j, xin in enumerate(x):
                r = sum(ci * hist[i][2][j].double() for i, ci in enumerate(c))
                outs.append((xin.double() + r).to(xin.dtype))
            return outs

        return fit
    raise ValueError(f"unknown predictor {name!r}")


# -- the block hooks ----------------------------------------------------------------------------------


class _Args:
    def __init__(self, fn):
        self.sig = inspect.signature(fn)

    def bind(self, args, kwargs) -> Dict:
        return self.sig.bind_partial(*args, **kwargs).arguments


class Emulator:
    """Skipped steps of ``model`` predicted for the middle blocks ``n_f .. N-1-n_b`` (module docstring)."""

    def __init__(self, model):
        tr = model.transformer
        fam = families.FAMILIES[type(tr).__name__]
        self.blocks = [b for _, b in fam.stack(tr)]
        self.specs = [fam.spec_for(b) for b in self.blocks]
        self.n = len(self.blocks)
        self.model = model
        self.nbranch = 2 if model.spec.guidance_scale != 1 else 1
        self.active = False
        self.calls = 0
        self.time = math.nan
        self._orig = []
        for i, b in enumerate(self.blocks):
            orig = b.forward
            self._orig.append(b.__dict__.get("forward"))  # an instance forward set before (None: the class's)
            b.forward = self._wrap(i, b, orig, _Args(orig))
        self._pre = tr.register_forward_pre_hook(self._on_call, with_kwargs=True)

    def close(self):
        for b, orig in zip(self.blocks, self._orig):
            if orig is None:
                del b.forward
            else:
                b.forward = orig
        self._pre.remove()

    def _on_call(self, mod, args, kwargs):
        if not self.active:
            return None
        ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.time = float(ts.reshape(-1)[0]) if torch.is_tensor(ts) else float(ts)
        c = self.calls
        self.calls += 1
        self.k, self.branch = c // self.nbranch, c % self.nbranch
        self.skip = self.k not in self.schedule
        return None

    def _wrap(self, i, block, orig, reader):
        spec = self.specs[i]
        emu = self

        def forward(*args, **kwargs):
            if not emu.active:
                return orig(*args, **kwargs)
            a, z = emu.n_f, emu.n - 1 - emu.n_b
            if i < a or i > z:
                return orig(*args, **kwargs)
            bound = reader.bind(args, kwargs)
            h = bound[spec.hidden_arg]
            e = bound.get(spec.encoder_arg) if spec.encoder_arg else None
            if not emu.skip:
                if i == a:
                    emu._in = (h, e)
                out = orig(*args, **kwargs)
                if i == z:
                    h0, e0 = emu._in
                    ho = spec.stream_of(block, out)
                    res = [(ho.float() - h0.float())]
                    if e0 is not None:
                        eo = out[spec.encoder_index]
                        res.append(eo.float() - e0.float())
                    hist = emu.hist.setdefault(emu.branch, [])
                    hist.insert(0, (emu.k, emu.time, res))
                    del hist[KEEP:]
                return out
            if i == a:
                hist = emu.hist.get(emu.branch)
                if not hist:
                    raise RuntimeError(f"step {emu.k} skipped with no stored residual")
                x = [h.float()] + ([e.float()] if e is not None else [])
                outs = emu.predictor(hist, emu.k, emu.time, x)
                h = outs[0].to(h.dtype)
                if e is not None:
                    e = outs[1].to(e.dtype)
            return spec.assemble(block, e, h)

        return forward

    def run(self, seeds, labels, steps: int, schedule: Sequence[int], n_f: int, n_b: int, predictor: str):
        if not (0 <= n_f and 0 <= n_b and n_f + n_b < self.n):
            raise ValueError(f"n_f={n_f}, n_b={n_b}: the middle of {self.n} blocks must keep at least one block")
        self.schedule = frozenset(schedule)
        self.n_f, self.n_b = n_f, n_b
        self.predictor = parse_predictor(predictor, steps)
        self.hist: Dict[int, list] = {}
        self.calls = 0
        self.active = True
        try:
            return self.model.sample(seeds, labels, steps=steps)
        finally:
            self.active = False
            self.hist = {}


def block_macs(model, seeds, labels, steps: int) -> List[int]:
    """Multiply-accumulates of each block's Linears over a full run (counted only inside the block,
    as bench/peers.py's count_macs)."""
    fam = families.FAMILIES[type(model.transformer).__name__]
    blocks = [b for _, b in fam.stack(model.transformer)]
    macs = [0] * len(blocks)
    cur: List[Optional[int]] = [None]
    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(lambda mod, args, i=i: cur.__setitem__(0, i)))
        handles.append(b.register_forward_hook(lambda mod, args, out: cur.__setitem__(0, None), always_call=True))

        def hook(mod, args, out):
            if cur[0] is not None:
                macs[cur[0]] += mod.in_features * mod.out_features * math.prod(args[0].shape[:-1])

        handles += [m.register_forward_hook(hook) for m in b.modules() if isinstance(m, torch.nn.Linear)]
    try:
        model.sample(seeds, labels, steps=steps)
    finally:
        for hd in handles:
            hd.remove()
    return macs
