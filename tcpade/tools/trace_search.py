"""A calibration search on a small run budget: score schedules offline from one recorded run,
then verify the best few for real.

``tcpade.calibrate``'s refine search measures every candidate schedule with a sampling run of
every calibration input, 100-600 runs per step count: hours on a large model. This search
spends a fixed budget of runs (e.g. 20 at 20 steps, 40 at 50, the full computation included):

1. record: the full-computation run (the reference every candidate is compared with) also
   records the block stack's residual R = h_out - h_in of every call, per branch (``Recorder``:
   it wraps ``Runtime.finish`` while it is active). Memory is bounded: of a hidden state of
   shape (..., C) only ``max_rows`` token rows (a fixed random subset, the same for every step)
   are kept, each row whole, so the rational predictor's per-row denominator is exact on them;
   with the row's RMS of h_out, which the output layer's norm divides by.
2. score offline (``ErrorTable``): every "predict step j from the computed steps c < a < b"
   with the predictor's own coefficients (``tcpade.core.coef.build_coef``, along the config's
   time axis, with its damping; the predictions are those of ``tcpade.core.reference``), its
   error against the recorded R_j, per row over h_out's RMS, the branches combined as the
   guidance combines them, weighted by how much a unit error at step j moves the final sample
   (``output_weights``: the noise scheduler's steps run on a scalar). The input-change
   correction (gamma) is not scored.
3. dynamic programming over schedules (``best_schedules``; state: the last three computed
   steps, exact for the rational predictor that reads three residuals): the schedules of K
   passes with the lowest offline error, the best few.
4. verification: the spaced rule, the offline best few and the best-scoring evenly spaced
   schedule are run for real (``score``), then single-step moves around the best measured
   one, ranked by their offline error, while the pass count's share of the budget lasts. The
   best measured schedule per pass count is returned; it is never below the spaced rule on the
   calibration inputs (the spaced rule is measured first). The offline error comes in three
   weightings (``weightings``: the scheduler's output weights; one that also counts what
   remains of the run after the step, as an early error moves the later steps' inputs; uniform);
   the one that orders the schedules measured so far most like their PSNR ranks the rest.
   Predictor "auto" (chosen online) is scored as the kernel variant it runs (rational).

The offline error alone misses how errors compound along the trajectory (the recorded residuals
are those of the full run), so the real runs decide; the offline error only orders them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import coef as K
from ..core import layout as L
from ..core import reference as ref

__all__ = ["ErrorTable", "Recorder", "Trace", "best_schedules", "default_runs", "output_weights", "search",
           "search_runner"]  # fmt: skip

NONE = -1  # "no computed step" in a history triple (fewer residuals stored than three)


# ------------------------------------------------------------------------------------ record
@dataclass
class Trace:
    """What a full-computation run recorded: per branch and step, R (rows x C, float32, CPU)
    and the RMS of h_out per row; the step's time (the clock's, as the predictor sees it)."""

    steps: int
    times: List[float]
    residuals: Dict[str, List[torch.Tensor]]  # branch -> per step (rows, C)
    scales: Dict[str, List[torch.Tensor]]  # branch -> per step (rows,): RMS of h_out per row
    rows: int = 0  # rows kept per recorded call

    @property
    def branches(self) -> Tuple[str, ...]:
        return tuple(self.residuals)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for rs in self.residuals.values() for r in rs) + sum(
            s.numel() * s.element_size() for ss in self.scales.values() for s in ss
        )


class Recorder:
    """Inside ``with Recorder() as rec:`` every computed call of every tcpade Runtime hands its
    residual to ``rec`` (``Runtime.finish`` is wrapped on the class while the block is active;
    not thread-safe: record one run at a time). ``rec.trace(steps)`` gives the ``Trace``.

    max_rows: token rows kept per call (a fixed random subset of the rows of h.reshape(-1, C),
    seeded; None keeps all): the trace holds max_rows x C x 4 bytes per step and branch (256 rows
    of FLUX's C = 3072: 3 MB; 50 steps of one branch: about 160 MB). Several runs inside one block (a pipeline
    runner calls once per input) are concatenated along the rows."""

    def __init__(self, max_rows: Optional[int] = 256, seed: int = 0):
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"Recorder: max_rows must be None or an int >= 1, got {max_rows!r}")
        self.max_rows, self.seed = max_rows, seed
        self._calls: Dict[Tuple[str, int], List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._times: Dict[int, float] = {}
        self._index: Dict[int, torch.Tensor] = {}
        self._saved = None

    def _rows(self, n: int) -> Optional[torch.Tensor]:
        if self.max_rows is None or n <= self.max_rows:
            return None
        if n not in self._index:
            g = torch.Generator().manual_seed(self.seed)
            self._index[n] = torch.randperm(n, generator=g)[: self.max_rows].sort().values
        return self._index[n]

    def add(self, branch: str, k: int, t: float, h_in: Optional[torch.Tensor], h_out: torch.Tensor) -> None:
        """Record one computed call: step ``k`` at time ``t`` of ``branch`` (h_in None: R = h_out)."""
        c = h_out.shape[-1]
        out = h_out.detach().reshape(-1, c)
        idx = self._rows(out.shape[0])
        if idx is not None:
            out = out[idx.to(out.device)]
        r = out.float()
        if h_in is not None:
            x = h_in.detach().reshape(-1, c)
            r = r - (x[idx.to(x.device)] if idx is not None else x).float()
        scale = out.float().pow(2).mean(-1).sqrt()
        self._calls.setdefault((branch, int(k)), []).append((r.cpu(), scale.cpu()))
        self._times.setdefault(int(k), float(t))

    def __enter__(self) -> "Recorder":
        from ..policy.runtime import Runtime

        if self._saved is not None:
            raise RuntimeError("Recorder: already recording")
        original = Runtime.finish
        rec = self

        def finish(rt, branch, h_in, h_out):
            b = rt.branches.get(branch)
            p = b.pending if b is not None else None
            if p is not None and h_out is not None:
                rec.add(branch, p.k, p.t, None if rt.zero_input else h_in, h_out)  # what the history holds
            return original(rt, branch, h_in, h_out)

        self._saved = original
        Runtime.finish = finish
        return self

    def __exit__(self, *exc) -> None:
        from ..policy.runtime import Runtime

        Runtime.finish = self._saved
        self._saved = None

    def trace(self, steps: int) -> Trace:
        """The recorded run as a Trace of ``steps`` steps; ValueError when a step of a branch is missing."""
        if not self._calls:
            raise ValueError("Recorder: nothing recorded (was the run made with tcpade applied, every step computed?)")
        branches = sorted({b for b, _ in self._calls}, key=lambda b: (b != "cond", b))
        res, sc = {}, {}
        for b in branches:
            missing = [k for k in range(steps) if (b, k) not in self._calls]
            if missing:
                raise ValueError(f"Recorder: branch {b!r} has no computed call at step(s) {missing} of {steps}")
            res[b] = [torch.cat([r for r, _ in self._calls[(b, k)]]) for k in range(steps)]
            sc[b] = [torch.cat([s for _, s in self._calls[(b, k)]]) for k in range(steps)]
        rows = res[branches[0]][0].shape[0]
        return Trace(steps, [self._times[k] for k in range(steps)], res, sc, rows)


# ----------------------------------------------------------------------------------- weights
def output_weights(scheduler, steps: int) -> List[float]:
    """|d final sample / d model output at step j|, j < ``steps``, of ``scheduler``'s sampling loop
    with a model whose output does not depend on its input: the scheduler's steps run on a scalar
    (Euler flow matching: |sigma_j - sigma_{j+1}|; DDIM: its eps weight carried to the end).
    A step the scheduler makes that does not act linearly gives a meaningless weight: check."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    if callable(getattr(sched, "set_begin_index", None)):
        sched.set_begin_index(0)
    ts = list(sched.timesteps)
    if len(ts) != steps:
        raise ValueError(f"output_weights: {type(scheduler).__name__} made {len(ts)} timesteps for {steps} steps")
    out = []
    for j in range(steps):
        s = copy.deepcopy(sched)
        x = torch.zeros(1, dtype=torch.float64)
        for i, t in enumerate(ts):
            pred = torch.full_like(x, 1.0 if i == j else 0.0)
            x = s.step(pred, t, x, return_dict=False)[0]
        out.append(abs(float(x[0])))
    return out


# ------------------------------------------------------------------------------ offline error
def _predict(variant: str, y: Sequence[Optional[torch.Tensor]], cf: torch.Tensor) -> torch.Tensor:
    """The predictions for several targets at once: y = (R3 or None, R2 or None, R1), each (rows, C);
    cf (J, NCOEF) float32. Returns (J, rows, C), the numbers of ``tcpade.core.reference.predict_math``
    (no input-change term)."""
    y0, y1, y2 = y
    col = lambda i: cf[:, i].view(-1, 1, 1)  # noqa: E731
    if variant == "reuse":
        return y2.unsqueeze(0).expand(cf.shape[0], *y2.shape)
    if variant == "paper":
        out = []
        for row in cf:
            r3 = y0 if y0 is not None else torch.zeros_like(y2)
            r2 = y1 if y1 is not None else torch.zeros_like(y2)
            ring = torch.stack([y2, r2, r3])
            p, _ = ref.predict_math(torch.zeros_like(y2), ring, [0, 1, 2], row, variant="paper", write_out=True)
            out.append(p)
        return torch.stack(out)
    y1 = y1 if y1 is not None else torch.zeros_like(y2)
    if variant == "linear":
        main = col(K.LAM1) * y1 + col(K.LAM2) * y2
    else:  # rational, as reference._rational_main, one denominator per row
        y0 = y0 if y0 is not None else torch.zeros_like(y2)
        a0, a1, a2 = col(K.ALP0), col(K.ALP1), col(K.ALP2)
        t0, t1, t2 = col(K.TAU0), col(K.TAU1), col(K.TAU2)
        S = a0 * y0 + a1 * y1 + a2 * y2
        T = a0 * t0 * y0 + a1 * t1 * y1 + a2 * t2 * y2
        lin = col(K.LAM1) * y1 + col(K.LAM2) * y2
        lty = col(K.LAM1) * t1 * y1 + col(K.LAM2) * t2 * y2
        b1 = -(S * T).sum(-1) / ((T * T).sum(-1) + 1e-30)
        bmax = cf[:, K.BMAX].view(-1, 1)
        b1 = torch.maximum(torch.minimum(b1, bmax), -bmax)
        kappa = cf[:, K.KAPPA].view(-1, 1)
        if bool((kappa > 0).any()):
            ll = (lty * lty).sum(-1)
            dd = ((y2 - y1) ** 2).sum(-1)
            lim = kappa * torch.sqrt(dd)
            dev = b1.abs() * torch.sqrt(ll)
            scale = torch.where((kappa > 0) & (dev > lim), lim / torch.where(dev > lim, dev, torch.ones_like(dev)),
                                torch.ones_like(dev))  # fmt: skip
            b1 = b1 * scale
        main = lin + b1.unsqueeze(-1) * lty
    blend = col(K.C1) * y2 + col(K.C2) * y1
    return blend + col(K.W_MAIN) * main


def _quad(x, y, g3) -> torch.Tensor:
    """x^T G y per row: x, y three (Q, 1) weights, g3 (Q, 3, 3, rows) the rows' inner products."""
    return sum(x[k] * y[m] * g3[:, k, m] for k in range(3) for m in range(3))


class ErrorTable:
    """E[(c, a, b)][j]: the offline error of predicting step j from the residuals of computed
    steps c < a < b < j (c, or c and a, ``NONE`` while fewer are stored): the mean squared error
    per element (per row over h_out's RMS), branches combined with ``guidance`` (cond, uncond:
    g * e_cond + (1 - g) * e_uncond; one branch or None: the branches' squared errors added),
    times ``weights[j]`` squared.

    Rational, linear and reuse predict every row as a combination of its rows of R_c, R_a, R_b
    (rational's weights depend on the row only through its inner products), so the whole table
    comes exactly from the rows' inner products of every pair of recorded residuals (one
    einsum), computed at once for every (c, a, b, j) in float64 (``gram=True``). The paper
    predictor's element-wise form is predicted directly (``tcpade.core.reference``), one history
    at a time, when ``errors`` first asks for it (slow at 50 steps).

    max_gap: the table is filled only for schedules whose computed steps are at most ``max_gap``
    apart (the last one at most ``max_gap`` before the end): errors past it are inf, which keeps
    the DP off such schedules; ``errors`` of another history is computed directly when asked."""

    def __init__(self, trace: Trace, predictor: str = "rational", *, weights: Optional[Sequence[float]] = None,
                 guidance: Optional[float] = None, config_overrides: Optional[dict] = None,
                 normalize: bool = True, gram: bool = True, max_gap: Optional[int] = None):  # fmt: skip
        from ..policy.config import TCPadeConfig

        if max_gap is not None and (isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < 1):
            raise ValueError(f"ErrorTable: max_gap must be None or an int >= 1, got {max_gap!r}")

        if predictor not in L.PREDICTORS:
            raise ValueError(f"ErrorTable: predictor must be one of {L.PREDICTORS}, got {predictor!r}")
        cfg = TCPadeConfig(predictor=predictor, **dict(config_overrides or {}))
        self.trace, self.T = trace, trace.steps
        self.max_gap = self.T if max_gap is None else min(max_gap, self.T)
        if len(trace.times) != self.T:
            raise ValueError(f"ErrorTable: the trace has {len(trace.times)} times for {self.T} steps")
        self.variant = L.kernel_variant(predictor)
        self.lead = L.MIN_HISTORY[predictor]
        w = [1.0] * self.T if weights is None else [float(x) for x in weights]
        if len(w) != self.T or not all(math.isfinite(x) and x >= 0 for x in w):
            raise ValueError(f"ErrorTable: weights must be {self.T} finite numbers >= 0, got {weights!r}")
        self.w2 = np.asarray(w, dtype=np.float64) ** 2
        self.kw = dict(delta=cfg.pole_delta, kappa=cfg.kappa)
        if getattr(cfg, "damping", 0.0):  # the runtime passes it to rational and linear only
            self.kw["damping"] = cfg.damping
        # the time the predictor extrapolates along: the step index or the scheduler's time
        index = getattr(cfg, "time_axis", "schedule") == "index"
        self.axis = [float(j) for j in range(self.T)] if index else [float(t) for t in trace.times]
        self.stage = [K.stage_of(j, self.T, cfg.early_frac, cfg.late_frac) for j in range(self.T)]
        br = trace.branches
        if guidance is not None and len(br) == 2 and guidance != 1.0:
            g = float(guidance)
            self.mix = {br[0]: g, br[1]: 1.0 - g}
        else:
            self.mix = None
        self.R = {b: torch.stack(trace.residuals[b]) for b in br}  # (T, rows, C)
        # (T, rows): 1 / RMS of h_out per row (what the output layer's norm divides by)
        self.inv = {b: (1.0 / torch.stack(trace.scales[b]).clamp_min(1e-12)) if normalize
                    else torch.ones(self.T, trace.rows) for b in br}  # fmt: skip
        self._rows: Dict[Tuple[int, int, int], np.ndarray] = {}
        self.evaluated = 0  # predictions scored
        if gram and self.variant != "paper":
            self._fill()

    def _coefs(self, hist: Tuple[int, int, int], js: Sequence[int]) -> torch.Tensor:
        stored = [s for s in hist if s != NONE]
        times = [self.axis[s] for s in reversed(stored)] + [math.nan] * (3 - len(stored))
        rows = [K.build_coef(self.variant, self.stage[j], times, self.axis[j], len(stored), 3, gamma=0.0,
                             **self.kw) for j in js]  # fmt: skip
        return torch.tensor(rows, dtype=torch.float32)

    def histories(self) -> List[Tuple[int, int, int]]:
        """Every history (c, a, b) a schedule can reach: three computed steps, or fewer at its start."""
        T, G, out = self.T, self.max_gap, []
        for b in range(T):
            out.append((NONE, NONE, b))
            for a in range(max(0, b - G), b):
                out.append((NONE, a, b))
                out.extend((c, a, b) for c in range(max(0, a - G), a))
        return out

    def _fill(self, chunk: int = 0) -> None:
        """Every E[(c, a, b)][j] from the rows' inner products (see the class docstring)."""
        T, br = self.T, self.trace.branches
        rows = self.trace.rows
        X = torch.cat([self.R[b] for b in br]).double()  # (B*T, rows, C)
        C = X.shape[-1]
        Z = X.shape[0]  # index of a zero residual (a history slot not stored)
        gram = torch.zeros(Z + 1, Z + 1, rows, dtype=torch.float64)
        gram[:Z, :Z] = torch.einsum("prc,qrc->pqr", X, X)
        inv = torch.stack([self.inv[b] for b in br]).double()  # (B, T, rows)
        hists = self.histories()
        quads = [(c, a, b, j) for (c, a, b) in hists for j in range(b + 1, min(T, b + self.max_gap))]
        if not quads:
            for h in hists:
                self._rows[h] = np.full(T, np.inf)
            return
        q = torch.tensor(quads, dtype=torch.int64)
        cf = torch.tensor([K.build_coef(self.variant, self.stage[j], self._times((c, a, b)), self.axis[j],
                                        3 - (c, a, b).count(NONE), 3, gamma=0.0, **self.kw)
                           for c, a, b, j in quads], dtype=torch.float64)  # fmt: skip
        mix = [self.mix[b] for b in br] if self.mix is not None else None
        chunk = chunk or max(1, int(4e6 // (16 * len(br) ** 2 * rows)))
        out = torch.empty(len(quads), dtype=torch.float64)
        for lo in range(0, len(quads), chunk):
            out[lo : lo + chunk] = self._quad_errors(q[lo : lo + chunk], cf[lo : lo + chunk], gram, inv, Z, C, mix)
        out = torch.nan_to_num(out, nan=1e30, posinf=1e30)
        self.evaluated += len(quads)
        table = {h: np.full(T, np.inf) for h in hists}
        for (c, a, b, j), v in zip(quads, out.tolist()):
            table[(c, a, b)][j] = v
        self._rows.update(table)

    def _times(self, hist) -> List[float]:
        stored = [s for s in hist if s != NONE]
        return [self.axis[s] for s in reversed(stored)] + [math.nan] * (3 - len(stored))

    def _quad_errors(self, q, cf, gram, inv, Z, C, mix) -> torch.Tensor:
        """Mean squared (combined, normalised) error per element of the quadruples q = (c, a, b, j)."""
        T, nb = self.T, inv.shape[0]
        col = lambda i: cf[:, i].view(-1, 1)  # noqa: E731  (Q, 1): broadcasts over rows
        V, idx = [], []
        for i in range(nb):
            # (Q, 4): the Gram indices of y0, y1, y2, R_j in this branch
            ix = torch.stack([torch.where(q[:, k] == NONE, torch.full_like(q[:, k], Z), q[:, k] + i * T)
                              for k in range(4)], 1)  # fmt: skip
            g3 = gram[ix[:, :3, None], ix[:, None, :3]]  # (Q, 3, 3, rows)
            if self.variant == "reuse":
                u = [torch.zeros_like(col(0)), torch.zeros_like(col(0)), torch.ones_like(col(0))]
            else:
                l1, l2 = col(K.LAM1), col(K.LAM2)
                if self.variant == "rational":
                    al = [col(K.ALP0), col(K.ALP1), col(K.ALP2)]
                    be = [al[0] * col(K.TAU0), al[1] * col(K.TAU1), al[2] * col(K.TAU2)]
                    st, tt = _quad(al, be, g3), _quad(be, be, g3)
                    b1 = -st / (tt + 1e-30)
                    bmax = col(K.BMAX)
                    b1 = torch.maximum(torch.minimum(b1, bmax), -bmax)
                    kappa = col(K.KAPPA)
                    lam = [torch.zeros_like(l1), l1 * col(K.TAU1), l2 * col(K.TAU2)]
                    if bool((kappa > 0).any()):
                        ll = _quad(lam, lam, g3)
                        dif = [torch.zeros_like(l1), -torch.ones_like(l1), torch.ones_like(l1)]
                        lim = kappa * torch.sqrt(_quad(dif, dif, g3).clamp_min(0))
                        dev = b1.abs() * torch.sqrt(ll.clamp_min(0))
                        over = (kappa > 0) & (dev > lim)
                        b1 = b1 * torch.where(over, lim / torch.where(over, dev, torch.ones_like(dev)),
                                              torch.ones_like(dev))  # fmt: skip
                    main = [torch.zeros_like(b1), l1 + b1 * lam[1], l2 + b1 * lam[2]]
                else:  # linear
                    main = [torch.zeros_like(l1), l1, l2]
                w = col(K.W_MAIN)
                u = [w * main[0], w * main[1] + col(K.C2), w * main[2] + col(K.C1)]
            s = inv[i][q[:, 3]]  # (Q, rows): 1 / RMS of h_out at the target
            m = mix[i] if mix is not None else 1.0
            V.append([m * s * uk for uk in u] + [-m * s])
            idx.append(ix)
        err = 0.0
        pairs = [(i, k) for i in range(nb) for k in range(i, nb)] if mix is not None else [(i, i) for i in range(nb)]
        for i, k in pairs:
            g = gram[idx[i][:, :, None], idx[k][:, None, :]]  # (Q, 4, 4, rows)
            if i == k:  # symmetric: each off-diagonal term twice
                err = err + sum((1.0 if p == r else 2.0) * V[i][p] * V[k][r] * g[:, p, r]
                                for p in range(4) for r in range(p, 4))  # fmt: skip
            else:  # (i, k) and (k, i): the same sum
                err = err + 2.0 * sum(V[i][p] * V[k][r] * g[:, p, r] for p in range(4) for r in range(4))
        return err.mean(-1) / C

    def errors(self, c: int, a: int, b: int) -> np.ndarray:
        """E[(c, a, b)][j] for every j (inf where j <= b), weighted."""
        raw = self._raw(c, a, b)
        with np.errstate(invalid="ignore"):
            return np.where(np.isinf(raw), np.inf, raw * self.w2)

    def weighted(self, weights: Sequence[float]) -> "ErrorTable":
        """The same table under other step weights (the errors are shared, not computed again)."""
        w = [float(x) for x in weights]
        if len(w) != self.T or not all(math.isfinite(x) and x >= 0 for x in w):
            raise ValueError(f"ErrorTable: weights must be {self.T} finite numbers >= 0, got {weights!r}")
        other = copy.copy(self)
        other.w2 = np.asarray(w, dtype=np.float64) ** 2
        return other

    def _raw(self, c: int, a: int, b: int) -> np.ndarray:
        key = (c, a, b)
        if key in self._rows:
            return self._rows[key]
        out = np.full(self.T, np.inf)
        js = list(range(b + 1, self.T))
        if js:
            cf = self._coefs(key, js)
            total = torch.zeros(len(js), dtype=torch.float64)
            acc = None
            for br, R in self.R.items():
                y = tuple(R[s] if s != NONE else None for s in key)
                e = (_predict(self.variant, y, cf) - R[js]) * self.inv[br][js].unsqueeze(-1)
                if self.mix is None:
                    total += e.double().pow(2).mean((1, 2))
                else:
                    acc = self.mix[br] * e if acc is None else acc + self.mix[br] * e
            if acc is not None:
                total = acc.double().pow(2).mean((1, 2))
            total = torch.nan_to_num(total, nan=1e30, posinf=1e30)
            out[b + 1 :] = total.numpy()
            self.evaluated += len(js)
        self._rows[key] = out
        return out

    def start(self) -> Tuple[int, int, int]:
        """The history triple after the schedule's first ``lead`` steps."""
        s = [NONE, NONE, NONE] + list(range(self.lead))
        return tuple(s[-3:])

    def cost(self, sched: Sequence[int]) -> float:
        """The offline error of a schedule (sum over its predicted steps)."""
        sched = sorted(sched)
        hist, total = [NONE, NONE, NONE], 0.0
        ext = list(sched) + [self.T]
        for i, s in enumerate(sched):
            hist = hist[1:] + [s]
            nxt = ext[i + 1]
            if nxt > s + 1:
                total += float(self.errors(*hist)[s + 1 : nxt].sum())
        return total


# -------------------------------------------------------------------------------------- DP
def best_schedules(table, steps: int, passes: int, lead: int, count: int = 1) -> List[Tuple[float, Tuple[int, ...]]]:
    """The ``count`` schedules of ``passes`` computed steps of ``steps`` (starting with steps
    0..lead-1) of the lowest offline error, exactly, by dynamic programming over the last three
    computed steps; as (error, schedule), lowest first. ``table.errors(c, a, b)`` gives the error
    of predicting every step j from the computed steps c < a < b (NONE: not stored yet)."""
    if not lead <= passes <= steps:
        raise ValueError(f"best_schedules: passes must be in [{lead}, {steps}], got {passes}")
    if passes == steps:
        return [(0.0, tuple(range(steps)))]
    T = steps
    start = ([NONE, NONE, NONE] + list(range(lead)))[-3:]
    # seg[c, a, b, n]: error of the steps b+1..n-1 predicted from (c, a, b); n = T: to the end
    cum: Dict[Tuple[int, int, int], np.ndarray] = {}

    def seg_row(c, a, b):
        key = (c, a, b)
        if key not in cum:
            e = np.asarray(table.errors(c, a, b), dtype=np.float64)
            z = np.zeros(T + 1)
            z[b + 2 :] = np.cumsum(e[b + 1 :])[: T - b - 1]  # z[n] = sum e[b+1 .. n-1]
            cum[key] = z
        return cum[key]

    # states: (c, a, b) -> (cost, back-pointer state)
    frontier = {tuple(start): (0.0, None)}
    layers = [frontier]
    for _ in range(passes - lead):
        nxt: Dict[Tuple[int, int, int], Tuple[float, tuple]] = {}
        for (c, a, b), (v, _) in frontier.items():
            z = seg_row(c, a, b)
            for n in range(b + 1, T):
                if not math.isfinite(z[n]):
                    break
                cand = v + float(z[n])
                key = (a, b, n)
                if key not in nxt or cand < nxt[key][0]:
                    nxt[key] = (cand, (c, a, b))
        frontier = nxt
        layers.append(frontier)
    finals = sorted((v + float(seg_row(*st)[T]), st) for st, (v, _) in frontier.items())
    finals = [f for f in finals if math.isfinite(f[0])]
    out = []
    for total, st in finals[:count]:
        sched, depth, cur = [], len(layers) - 1, st
        while depth > 0:
            sched.append(cur[2])
            cur = layers[depth][cur][1]
            depth -= 1
        sched = list(range(lead)) + sorted(sched)
        out.append((total, tuple(sched)))
    return out


# ---------------------------------------------------------------------------------- search
def _moves(sched: Sequence[int], steps: int, lead: int) -> List[Tuple[int, ...]]:
    """Every schedule that moves one computed step (past the lead) by 1 or 2 steps, keeping order."""
    cur, out = list(sched), []
    for i in range(lead, len(cur)):
        lo = cur[i - 1] + 1
        hi = cur[i + 1] - 1 if i + 1 < len(cur) else steps - 1
        for d in (-1, 1, -2, 2):
            new = cur[i] + d
            if lo <= new <= hi:
                out.append(tuple(cur[:i] + [new] + cur[i + 1 :]))
    return out


@dataclass
class Log:
    """The search's measurements: (passes, schedule, calibration PSNR, offline error, why it ran)."""

    rows: List[tuple] = field(default_factory=list)


def _concordance(table, rows) -> int:
    """Pairs of measured schedules (same pass count) that ``table``'s offline error orders as the
    measured PSNR does, minus those it orders the other way."""
    out = 0
    for i, (k1, s1, v1) in enumerate(rows):
        for k2, s2, v2 in rows[i + 1 :]:
            if k1 == k2 and v1 != v2:
                c1, c2 = table.cost(s1), table.cost(s2)
                if c1 != c2:
                    out += 1 if (v1 > v2) == (c1 < c2) else -1
    return out


def search(score: Callable[[Sequence[int]], float], steps: int, targets: Sequence[int], lead: int, tables,
           runs: int, *, candidates: int = 2, progress: bool = False, log: Optional[Log] = None,
           spaced_rule: Optional[Callable[[int], Tuple[int, ...]]] = None,
           ) -> Tuple[Dict[int, Tuple[int, ...]], Dict[int, float]]:  # fmt: skip
    """The search's verification part: for every pass count in ``targets``, at most its share of
    ``runs`` calls of ``score`` (one sampling run of every calibration input each).

    tables: one ``ErrorTable`` or several (the same errors under different step weights). The
    table "chosen" is the one whose offline error orders the schedules measured so far (every
    pass count) most like their PSNR. Per pass count: the spaced rule; the schedule of lowest
    offline error (``best_schedules``) of every table (the first count) or of the chosen one (the
    later counts); then, by the chosen table, the evenly spaced schedule of lowest offline error,
    its next ``candidates - 1`` schedules, the other tables' best, and single-step moves around
    the best measured schedule, lowest offline error first. The runs are shared evenly among the pass
    counts, most passes first; runs a count leaves unused go to the next. Returns ({passes:
    schedule}, {passes: calibration PSNR}), as ``tcpade.tools.calibrate``'s searches do.
    ``runs`` must allow one run per pass count. ``spaced_rule(k)``: the spaced rule's schedule
    of k passes as the runs place it (on the run's times, ``TCPadeConfig.time_spacing``;
    default: on the step index)."""
    from ..policy import schedules as S

    tables = list(tables) if isinstance(tables, (list, tuple)) else [tables]
    if not tables:
        raise ValueError("trace search: no error table given")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trace search: steps must be an int >= 1, got {steps!r}")
    if any(t.T != steps for t in tables):
        raise ValueError(f"trace search: the error table is of a {tables[0].T}-step run, steps is {steps}")
    targets = sorted({int(k) for k in targets}, reverse=True)
    if not targets:
        raise ValueError("trace search: no pass count given")
    bad = [k for k in targets if not lead <= k <= steps]
    if bad:
        raise ValueError(f"trace search: pass counts must be in [{lead}, {steps}], got {bad}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < len(targets):
        raise ValueError(f"trace search: runs must be an int >= the number of pass counts ({len(targets)}) "
                         f"(one run per count at least: the spaced rule), got {runs!r}")  # fmt: skip
    if candidates < 1:
        raise ValueError(f"trace search: candidates must be >= 1, got {candidates!r}")
    log = log if log is not None else Log()
    path, curve = {}, {}
    spent = 0  # runs used so far: a count that needs fewer than its share leaves them to the next ones
    measured: List[Tuple[int, Tuple[int, ...], float]] = []  # (passes, schedule, PSNR), every count
    from .calibrate import _bar

    def chosen():
        return max(tables, key=lambda t: (_concordance(t, measured), -tables.index(t)))

    bar = _bar(len(targets), progress, steps)
    try:
        for i, k in enumerate(targets):
            seen: Dict[Tuple[int, ...], float] = {}
            left = (runs - spent) // (len(targets) - i)

            def measure(s, why, k=k, seen=seen, left=left):
                s = tuple(s)
                if s in seen or len(seen) >= left:
                    return
                seen[s] = score(s)
                measured.append((k, s, seen[s]))
                log.rows.append((k, s, seen[s], tables[0].cost(s), why))

            if k == steps:
                measure(range(steps), "full")
                path[k], curve[k] = tuple(range(steps)), seen[tuple(range(steps))]
                spent += 1
                bar.step(f"{k} passes")
                continue
            measure(spaced_rule(k) if spaced_rule is not None else S.spaced(steps, k, lead), "spaced")
            ranked = {id(t): best_schedules(t, steps, k, lead, candidates) for t in tables}
            # the first count measures every table's best schedule; the later ones that of the table
            # chosen so far first, the others' last
            order = tables if i == 0 else [chosen()]
            for t in order:
                if ranked[id(t)]:
                    measure(ranked[id(t)][0][1], f"offline{tables.index(t)}")
            t = chosen()
            fam = sorted(S.even_family(steps, k, lead), key=t.cost)
            for s in fam:
                if tuple(s) not in seen:
                    measure(s, f"even{tables.index(t)}")
                    break
            for _, s in ranked[id(t)][1:]:
                measure(s, f"offline{tables.index(t)}")
            for t in tables:
                if ranked[id(t)]:
                    measure(ranked[id(t)][0][1], f"offline{tables.index(t)}")
            tried = set(seen)
            while len(seen) < left:
                best = max(seen, key=seen.get)
                moves = [m for m in _moves(best, steps, lead) if m not in tried]
                if not moves:
                    break
                t = chosen()
                m = min(moves, key=t.cost)
                tried.add(m)
                measure(m, f"move{tables.index(t)}")
            best = max(seen, key=seen.get)
            path[k], curve[k] = best, seen[best]
            spent += len(seen)
            bar.step(f"{k} passes {seen[best]:.2f} dB")
    finally:
        bar.close()
    return path, curve


def search_runner(runner, score: Callable[[Sequence[int]], float], steps: int, targets: Sequence[int], lead: int,
                  predictor: str, trace: Trace, budget: int, used: int = 0, *,
                  config_overrides: Optional[dict] = None, progress: bool = False, log: Optional[Log] = None,
                  candidates: int = 2, spaced_rule: Optional[Callable[[int], Tuple[int, ...]]] = None):  # fmt: skip
    """``search`` inside ``tcpade.calibrate``: ``budget`` runs in all, ``used`` of them spent
    already (the full computation that recorded ``trace``); the error table is built from
    ``trace`` and what the calibration runner (``tcpade.tools.runner``) knows: the noise
    scheduler's output weights and the guidance scale (a zoo model's, or a bare transformer's
    ``guidance_scale`` input; else uniform weights and the branches' errors added)."""
    n = len(set(targets))
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"trace search: the run budget must be an int, got {budget!r}")
    if budget - used < n:
        raise ValueError(f"trace search: a budget of {budget} runs leaves {budget - used} after the {used} already "
                         f"made, fewer than one per pass count ({n}); give at least {used + n}")  # fmt: skip
    scheduler, guidance = _runner_facts(runner)
    weights = None
    if scheduler is not None:
        with contextlib.suppress(Exception):  # a scheduler that needs more than set_timesteps(steps)
            weights = output_weights(scheduler, steps)
    gap = default_gap(steps, min(targets))
    table = ErrorTable(trace, predictor, guidance=guidance, config_overrides=config_overrides, max_gap=gap)
    tables = [table] if weights is None else [table.weighted(w) for w in weightings(weights)]
    return search(score, steps, targets, lead, tables, budget - used, candidates=candidates, progress=progress,
                  log=log, spaced_rule=spaced_rule)  # fmt: skip


def weightings(weights: Sequence[float]) -> List[List[float]]:
    """The step weightings the search ranks schedules by, from the scheduler's output weights w:
    w itself (an error's direct effect on the sample), sqrt(w_j * sum_{i >= j} w_i) (an early
    error also moves every later step's input: weighted by what remains of the run too), and
    uniform (a DDIM model's early weights are large, yet the later steps correct much of an early
    error)."""
    w = [float(x) for x in weights]
    rest = [sum(w[j:]) for j in range(len(w))]
    return [w, [math.sqrt(a * b) for a, b in zip(w, rest)], [1.0] * len(w)]


def default_runs(steps: int) -> int:
    """The trace search's run budget at ``steps`` steps, the full computation included: 20 up to
    20 steps, 40 above."""
    return 20 if steps <= 20 else 40


def default_gap(steps: int, passes: int) -> int:
    """The error table's ``max_gap`` for schedules of ``passes`` of ``steps``: 2.5 times their mean gap."""
    return min(steps, max(3, math.ceil(2.5 * (steps - 1) / max(1, passes - 1))))


def _runner_facts(runner):
    """(noise scheduler or None, guidance scale or None) of a calibration runner."""
    model = getattr(runner, "model", None)
    if model is not None and hasattr(model, "spec"):  # ZooRunner
        return model.noise_scheduler(), float(model.spec.guidance_scale)
    if hasattr(runner, "scheduler"):  # TransformerRunner
        gs = {kw.get("guidance_scale", 1.0) for kw in runner.inputs if kw.get("uncond") is not None}
        return runner.scheduler, (float(gs.pop()) if len(gs) == 1 else None)
    pipe = getattr(runner, "pipe", None)
    if pipe is not None:
        return getattr(pipe, "scheduler", None), None
    return None, None
