"""CFG branches on schedules of their own, the unconditional residual predicted from the guidance
difference (a measurement study outside the library).

A subclass of bench/research/predictor_2p5x/emu.py's Emulator (whole-stack skipping; branch 0 = cond,
branch 1 = uncond, called in that order at each step). ``run(seeds, labels, T, sc, su, mode)``:

* the cond branch computes the steps ``sc``; on the others its residual is extrapolated linearly in
  the step index from its two newest computed residuals (reuse while one is stored): the library's
  ``linear``;
* the uncond branch computes the steps ``su`` (a subset of ``sc``). On the steps where both are
  computed, D = R_cond - R_uncond is stored (per stream). On an uncond skip:
  - mode "own": linear on the uncond branch's own computed residuals (the library: each branch its own);
  - mode "dreuse": R_uncond = R_cond(k) - D1 (R_cond(k) computed or predicted at this step, D1 the newest D);
  - mode "dlin": R_uncond = R_cond(k) - (D1 + (D1 - D2)(k - k1)/(k1 - k2)) (reuse of D1 while one is stored);
  - mode "dbeta:<b>": R_cond(k) - (D1 + b (D1 - D2)(k - k1)/(k1 - k2)): 0 is dreuse, 1 dlin;
  - mode "dauto": dbeta with b in (0, 0.5, 1) chosen by the smallest summed squared error of its
    prediction of D on the run's computed steps so far (b = 0 before any);
  - mode "mix": "dreuse" where the cond branch computed step k, "own" where it skipped it.
Cost: one block-stack pass per computed branch call.
"""
from __future__ import annotations

from typing import Dict, Sequence

import emu  # bench/research/predictor_2p5x


def lin(hist, k):
    """hist: [(k_i, [tensors])] newest first -> [tensors] at k (reuse with one entry)."""
    k1, r1 = hist[0]
    if len(hist) < 2:
        return [r.clone() for r in r1]
    k2, r2 = hist[1]
    a = (k - k1) / (k1 - k2)
    return [x + (x - y) * a for x, y in zip(r1, r2)]


def dlin(hist, k, beta):
    """The newest D extrapolated with its slope scaled by beta (0: reuse, 1: linear)."""
    k1, r1 = hist[0]
    if len(hist) < 2 or beta == 0:
        return [r.clone() for r in r1]
    k2, r2 = hist[1]
    a = beta * (k - k1) / (k1 - k2)
    return [x + (x - y) * a for x, y in zip(r1, r2)]


class CfgEmulator(emu.Emulator):
    def _on_call(self, mod, args, kwargs):
        super()._on_call(mod, args, kwargs)
        if self.active:
            self.skip = self.k not in (self.sc if self.branch == 0 else self.su)
        return None

    def _wrap(self, i, block, orig, reader):
        spec = self.specs[i]
        em = self

        def forward(*args, **kwargs):
            if not em.active:
                return orig(*args, **kwargs)
            bound = reader.bind(args, kwargs)
            h = bound[spec.hidden_arg]
            e = bound.get(spec.encoder_arg) if spec.encoder_arg else None
            if not em.skip:
                if i == 0:
                    em._in = (h, e)
                out = orig(*args, **kwargs)
                if i == em.n - 1:
                    h0, e0 = em._in
                    res = [spec.stream_of(block, out).float() - h0.float()]
                    if e0 is not None:
                        res.append(out[spec.encoder_index].float() - e0.float())
                    em.own.setdefault(em.branch, []).insert(0, (em.k, res))
                    del em.own[em.branch][3:]
                    if em.branch == 0:
                        em.rc = (em.k, res)
                    else:
                        assert em.rc[0] == em.k
                        d = [a - b for a, b in zip(em.rc[1], res)]
                        if em.dh:  # what each damping would have predicted for this D (the "dauto" choice)
                            for beta in em.betas:
                                pr = dlin(em.dh, em.k, beta)
                                em.derr[beta] = em.derr.get(beta, 0.0) + sum(float((x - y).pow(2).sum()) for x, y in zip(pr, d))
                        em.dh.insert(0, (em.k, d))
                        del em.dh[3:]
                return out
            if i == 0:
                if em.branch == 0:
                    r = lin(em.own[0], em.k)
                    em.rc = (em.k, r)
                else:
                    m = em.mode
                    if m == "mix":
                        m = "dreuse" if em.k in em.sc else "own"
                    if m == "own":
                        r = lin(em.own[1], em.k)
                    else:
                        if m == "dreuse":
                            d = em.dh[0][1]
                        elif m == "dlin":
                            d = lin(em.dh, em.k)
                        elif m.startswith("dbeta:"):
                            d = dlin(em.dh, em.k, float(m.split(":")[1]))
                        elif m == "dauto":
                            beta = min(em.betas, key=lambda b: (em.derr.get(b, 0.0), b)) if em.derr else em.betas[0]
                            em.chosen.append(beta)
                            d = dlin(em.dh, em.k, beta)
                        else:
                            raise ValueError(m)
                        assert em.rc[0] == em.k
                        r = [a - b for a, b in zip(em.rc[1], d)]
                h = (h.float() + r[0]).to(h.dtype)
                if e is not None:
                    e = (e.float() + r[1]).to(e.dtype)
            return spec.assemble(block, e, h)

        return forward

    def run(self, seeds, labels, steps: int, sc: Sequence[int], su: Sequence[int], mode: str):
        if not set(su) <= set(sc):
            raise ValueError("su must be a subset of sc")
        if self.nbranch != 2:
            raise ValueError("the model samples without CFG")
        self.sc, self.su, self.mode = frozenset(sc), frozenset(su), mode
        self.schedule = self.sc
        self.nostore = frozenset()
        self.own: Dict[int, list] = {}
        self.dh: list = []
        self.derr: dict = {}
        self.chosen: list = []
        self.betas = list(getattr(self, "betas_", (0.0, 0.5, 1.0)))
        self.rc = (None, None)
        self.calls = 0
        self.active = True
        try:
            return self.model.sample(seeds, labels, steps=steps)
        finally:
            self.active = False
            self.own, self.dh = {}, []
