"""CFG branches on schedules of their own, the unconditional residual predicted from the guidance
difference (a measurement study outside the library).

A subclass of bench/research/predictor_2p5x/emu.py's Emulator (its block wrapping; this changes
what a computed call stores and what a skipped one returns; whole-stack skipping; branch 0 = cond,
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

    def computed(self, res, xs) -> None:
        self.own.setdefault(self.branch, []).insert(0, (self.k, res))
        del self.own[self.branch][3:]
        if self.branch == 0:
            self.rc = (self.k, res)
            return
        assert self.rc[0] == self.k
        d = [a - b for a, b in zip(self.rc[1], res)]
        if self.dh:  # what each damping would have predicted for this D (the "dauto" choice)
            for beta in self.betas:
                pr = dlin(self.dh, self.k, beta)
                self.derr[beta] = self.derr.get(beta, 0.0) + sum(float((x - y).pow(2).sum()) for x, y in zip(pr, d))
        self.dh.insert(0, (self.k, d))
        del self.dh[3:]

    def skipped(self, x):
        if self.branch == 0:
            r = dlin(self.own[0], self.k, 1.0)
            self.rc = (self.k, r)
        else:
            m = self.mode
            if m == "mix":
                m = "dreuse" if self.k in self.sc else "own"
            if m == "own":
                r = dlin(self.own[1], self.k, 1.0)
            else:
                if m == "dreuse":
                    d = self.dh[0][1]
                elif m == "dlin":
                    d = dlin(self.dh, self.k, 1.0)
                elif m.startswith("dbeta:"):
                    d = dlin(self.dh, self.k, float(m.split(":")[1]))
                elif m == "dauto":
                    beta = min(self.betas, key=lambda b: (self.derr.get(b, 0.0), b)) if self.derr else self.betas[0]
                    self.chosen.append(beta)
                    d = dlin(self.dh, self.k, beta)
                else:
                    raise ValueError(m)
                assert self.rc[0] == self.k
                r = [a - b for a, b in zip(self.rc[1], d)]
        return [xi + ri for xi, ri in zip(x, r)]

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
