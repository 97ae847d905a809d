"""Whole-stack skipping emulated outside the library with custom predictors (measurement only).

A subclass of bench/research/partial_stack/emulate.py's Emulator (n_f = n_b = 0 only): the forward of every block
of the stack is wrapped in this process; a pre-hook on the transformer counts calls (CFG: call index
mod 2 is the branch; each branch has its own history and predictor state). On a computed step the
stack input x (image stream, and FLUX's text stream) and the residual R = h_out - h_in are stored
(newest first, KEEP kept) and the predictor's ``observe`` is called first (so it can compare what it
would have predicted with the truth); on a skipped step block 0 returns ``pred.predict(...)`` (the
predicted h_out, per stream) and the other blocks pass through. A subclass changes only
``computed(res, xs)`` and ``skipped(x)`` (bench/research/cfg_delta/cfgemu.py).
hist entries: (k, t, [R per stream], [x per stream]) in float32.
Diagnostic: ``run(..., exact=steps)`` computes those skipped steps exactly without storing them.
"""
from __future__ import annotations

from typing import Dict, Sequence

import emulate  # bench/research/partial_stack (PYTHONPATH, see README.md): the block wrapping and call counting

KEEP = 5


class Emulator(emulate.Emulator):
    """partial_stack's Emulator (its block wrapping, call counting and ``close``) with whole-stack
    skipping, predictor objects with state, and the ``exact`` diagnostic (module docstring)."""

    def _wrap(self, i, block, orig, reader):
        spec = self.specs[i]
        emu = self

        def forward(*args, **kwargs):
            if not emu.active:
                return orig(*args, **kwargs)
            bound = reader.bind(args, kwargs)
            h = bound[spec.hidden_arg]
            e = bound.get(spec.encoder_arg) if spec.encoder_arg else None
            if not emu.skip:
                if i == 0:
                    emu._in = (h, e)
                out = orig(*args, **kwargs)
                if i == emu.n - 1:
                    h0, e0 = emu._in
                    res = [spec.stream_of(block, out).float() - h0.float()]
                    xs = [h0.float()]
                    if e0 is not None:
                        res.append(out[spec.encoder_index].float() - e0.float())
                        xs.append(e0.float())
                    emu.computed(res, xs)
                return out
            if i == 0:
                outs = emu.skipped([h.float()] + ([e.float()] if e is not None else []))
                h = outs[0].to(h.dtype)
                if e is not None:
                    e = outs[1].to(e.dtype)
            return spec.assemble(block, e, h)

        return forward

    # what a subclass changes: a computed call's residuals R and inputs x (per stream), and a skipped
    # call's outputs from its inputs x
    def computed(self, res, xs) -> None:
        if self.k in self.nostore:
            return
        hist = self.hist.setdefault(self.branch, [])
        st = self.state.setdefault(self.branch, {})
        if hist:
            self.pred.observe(hist, self.k, self.time, xs, res, st)
        hist.insert(0, (self.k, self.time, res, xs))
        del hist[KEEP:]

    def skipped(self, x):
        hist = self.hist.get(self.branch)
        if not hist:
            raise RuntimeError(f"step {self.k} skipped with no stored residual")
        return self.pred.predict(hist, self.k, self.time, x, self.state.setdefault(self.branch, {}))

    def run(self, seeds, labels, steps: int, schedule: Sequence[int], pred, exact: Sequence[int] = ()):
        """``exact``: steps that are computed but not stored (a diagnostic: the truth at those
        skipped steps, the history as if they had been skipped)."""
        self.nostore = frozenset(exact)
        self.schedule = frozenset(schedule) | self.nostore
        self.pred = pred
        self.hist: Dict[int, list] = {}
        self.state: Dict[int, dict] = {}
        self.calls = 0
        self.active = True
        try:
            return self.model.sample(seeds, labels, steps=steps)
        finally:
            self.active = False
            self.hist = {}
            self.state = {}
