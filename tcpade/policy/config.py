"""TCPadeConfig: every knob of the skip policy and the predictor, with presets.

Each field says what it does, its default, its allowed range, and which direction is
faster (fewer full block-stack passes). A bad value raises ValueError naming the field
and the allowed range.

Presets (bench/results/quality.md and calibration.md compare them with every peer on the
zoo's trained models): ``paper()`` reproduces the published method (for fidelity, not speed
or quality); ``slow()`` and ``fast()`` are compute budgets at 2.5x and 2.9x fewer block-stack
passes (8 and 7 of 20), with the time-aware rational predictor (or the predictor the model's
calibrations score best, when it is calibrated for several), placed by the model's
calibrated schedule when one is registered (the zoo ships them) and by the spaced rule
otherwise; ``adaptive()`` is error-controlled skipping (its compute follows the trajectory).
The field defaults are the conservative end of ``adaptive()`` (tolerance 0.05: about 1.3x at
20 steps on those models).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from ..core import coef as K
from . import schedules as S

POLICIES = ("tsi", "error")
LEVELS = ("block", "output")


class ConfigTypeError(TypeError, ValueError):
    """A TCPadeConfig field got a value of the wrong type (the message names the field)."""


def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v):
    return math.isfinite(v)


# field -> (type wanted, its check, range allowed, its check); __post_init__ walks this table.
_CHECKS = {
    "predictor": ("a str", lambda v: isinstance(v, str), f"one of {K.PREDICTORS}", lambda v: v in K.PREDICTORS),
    "policy": ("a str", lambda v: isinstance(v, str), f"one of {POLICIES}", lambda v: v in POLICIES),
    "level": ("a str", lambda v: isinstance(v, str), f"one of {LEVELS}", lambda v: v in LEVELS),
    "warmup": ("an int", _int, ">= 0", lambda v: v >= 0),
    "interval": ("an int", _int, ">= 0", lambda v: v >= 0),
    "final_steps": ("an int", _int, ">= 0", lambda v: v >= 0),
    "tsi_threshold": ("a number", _real, "a number >= 0", lambda v: v >= 0.0),
    "tolerance": ("a number", _real, "a finite number > 0", lambda v: _finite(v) and v > 0.0),
    "max_skips": ("an int", _int, ">= 0", lambda v: v >= 0),
    "store_predictions": ("a bool", lambda v: isinstance(v, bool), "True or False", lambda v: True),
    "input_correction": ("None or a number", lambda v: v is None or _real(v), "None or a finite number",
                         lambda v: v is None or _finite(v)),
    "early_frac": ("a number", _real, "in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "late_frac": ("a number", _real, "in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "pole_delta": ("a number", _real, "in (0, 1)", lambda v: 0.0 < v < 1.0),
    "kappa": ("a number", _real, "a finite number >= 0", lambda v: _finite(v) and v >= 0.0),
    "history_slots": ("an int", _int, "an int >= 3", lambda v: v >= 3),
    # The schedule and budget fields' ranges depend on each other and on the predictor:
    # _check_schedule_fields checks those after the types here.
    "schedule": ("None or a sequence of ints", lambda v: v is None or (not isinstance(v, (str, bytes)) and
                 hasattr(v, "__iter__")), "None or a sequence of ints", lambda v: True),
    "schedule_steps": ("None or an int", lambda v: v is None or _int(v), "None or an int > 0",
                       lambda v: v is None or v > 0),
    "passes": ("None or an int", lambda v: v is None or _int(v), "None or an int > 0", lambda v: v is None or v > 0),
    "speedup": ("None or a number", lambda v: v is None or _real(v), "None or a finite number >= 1",
                lambda v: v is None or (_finite(v) and v >= 1.0)),
    "budget_max_run": ("None or an int", lambda v: v is None or _int(v), "None or an int >= 1",
                       lambda v: v is None or v >= 1),
    "use_calibrated": ("a bool", lambda v: isinstance(v, bool), "True or False", lambda v: True),
    "calibrated_predictor": ("a bool", lambda v: isinstance(v, bool), "True or False", lambda v: True),
    "calibrated": ("a tuple", lambda v: isinstance(v, (tuple, list)), "((T, steps), ...)", lambda v: True),
}  # fmt: skip


def _bad(name, allowed, value):
    raise ValueError(f"TCPadeConfig.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class TCPadeConfig:
    predictor: str = "rational"
    """How a skipped step's residual is predicted: "paper" (the published [2/1] form),
    "rational" (time-aware [1/1] Pade, docs/method.md section 5), "reuse" (last residual),
    "linear" (in schedule time) or "auto" (per branch, whichever of rational and linear
    predicted the run's computed steps so far better: one more memory pass on each computed
    step).
    Not a speed knob: every predictor is one memory pass per skipped step."""

    level: str = "block"
    """What a skipped call predicts. "block": the residual h_out - h_in of the block stack; the
    embeddings before the stack and the output norm / projection after it run on every call.
    "output": what the transformer returns (its noise or velocity prediction), extrapolated
    from the branch's last computed outputs, as diffusers' TaylorSeer "lite" mode does; a
    skipped call runs nothing of the transformer (docs/method.md section 12). Which is more
    faithful depends on the model (bench/results/output_level.md); "output" skips slightly
    more work per skipped call."""

    policy: str = "error"
    """Which steps are skipped: "tsi" (the paper: fixed always-computed steps, others
    skipped while the TSI test passes) or "error" (docs/method.md section 7: the measured
    error of the predictor sizes the next run of skipped steps)."""

    warmup: int = 4
    """Steps 0..warmup are always computed (>= 0). Smaller = faster."""

    interval: int = 4
    """Every step k with k % interval == 0 is computed (>= 0; 0 = no such steps).
    tsi policy only. Larger = faster."""

    final_steps: int = 1
    """The last final_steps steps are computed (>= 0). Smaller = faster."""

    tsi_threshold: float = 1.0
    """tsi policy: skip while TSI <= tsi_threshold (TSI is in [0, 1]: 0 = the residuals
    move in a straight line, 1 = they reverse). >= 1 never blocks a skip. Larger = faster.
    (The published notes use a threshold parametrised differently; this one is monotone.)"""

    tolerance: float = 0.05
    """error policy: the relative error ||R_hat - R|| / ||R|| allowed for a predicted
    residual (> 0). Larger = faster."""

    max_skips: int = 3
    """Cap on consecutive skipped steps (>= 0; 0 = never skip). Larger = faster."""

    store_predictions: bool = False
    """Append predicted residuals to the history too (the paper's rule) instead of only
    computed ones. Not a speed knob."""

    input_correction: Optional[float] = None
    """Weight of the input-change correction h_out += w * (h_in - h_in_prev) on skipped
    steps; None = the predictor's default (paper 0.2, others 0). Not a speed knob."""

    early_frac: float = 0.3
    """Stage boundary: steps k <= early_frac * T are "early" (0 <= early_frac <= late_frac)."""

    late_frac: float = 0.8
    """Stage boundary: steps k > late_frac * T are "late" (early_frac <= late_frac <= 1)."""

    pole_delta: float = 0.3
    """rational: pole guard margin, 1 + b1 * tau >= pole_delta on the fit interval
    (0 < pole_delta < 1). Larger = safer, closer to linear extrapolation."""

    kappa: float = 0.0
    """rational: bound ||R_hat - R_linear|| <= kappa * ||R1 - R2|| per token row
    (>= 0; 0 = off)."""

    history_slots: int = 3
    """Residuals kept per branch (>= 3). Memory: history_slots (+1 with an input-change
    correction) hidden-state-sized tensors per CFG branch."""

    schedule: Optional[Tuple[int, ...]] = None
    """A fixed schedule: the steps (0-based, sorted) computed in a run of ``schedule_steps``
    steps; every other step is skipped and predicted, whatever ``policy``, ``warmup``,
    ``interval``, ``final_steps`` and ``max_skips`` say. It must start with the steps the
    predictor needs before its first skip (0 and 1; reuse: 0), so the pass count is exact
    (only a non-finite value forces more). A run of another length raises ValueError: use
    ``rescaled(T)`` or ``budget(...)``. Fewer steps = faster."""

    schedule_steps: Optional[int] = None
    """The run length T that ``schedule`` is for (required with it)."""

    passes: Optional[int] = None
    """A compute budget (``budget(passes=K)``): exactly min(K, T) computed steps per branch at
    any T, placed by the model's calibrated schedule when one matches, else the spaced rule
    (tcpade.policy.schedules). >= the predictor's minimum history (2; reuse 1). Fewer = faster."""

    speedup: Optional[float] = None
    """A compute budget as a ratio (``budget(speedup=S)``): round(T / S) passes, at least the
    predictor's minimum history (>= 1). Larger = faster."""

    budget_max_run: Optional[int] = None
    """A budget's guard for short runs: its pass count is raised until the spaced rule predicts
    at most this many steps in a row (e.g. ``slow()`` / ``fast()`` at 10 steps: 4 passes, not
    3). None = exactly the budget. Smaller = more passes at short T (slower, safer)."""

    use_calibrated: bool = True
    """A budget takes the model's calibrated schedule for (T, passes) when the registry has one
    (False: always the spaced rule). Not a speed knob."""

    calibrated_predictor: bool = False
    """A budget takes the predictor the model's calibrations score best with: when the registry
    holds calibrated schedules of this model for several predictors (the zoo ships rational for
    every model, linear and reuse for some), the one with the highest mean calibration PSNR over
    the (T, passes) they share replaces ``predictor`` (``tcpade.apply`` decides; the summary shows
    it). ``slow()`` and ``fast()`` set it unless given a predictor. Not a speed knob."""

    calibrated: Tuple = ()
    """The model's calibrated schedules ((T, steps), ...), filled in by ``tcpade.apply`` from the
    registry for a budget config; not meant to be set by hand."""

    def __post_init__(self):
        # One row per field: what type it takes, then what range. A wrong type raises
        # ConfigTypeError (a TypeError, and a ValueError too, so ``except ValueError`` catches
        # every bad config), a value out of range ValueError; both name the field.
        for name, (kind, is_kind, allowed, ok) in _CHECKS.items():
            v = getattr(self, name)
            if not is_kind(v):
                raise ConfigTypeError(f"TCPadeConfig.{name} must be {kind}, got {type(v).__name__} {v!r}")
            if not ok(v):
                raise ValueError(f"TCPadeConfig.{name} must be {allowed}, got {v!r}")
        if self.early_frac > self.late_frac:
            raise ValueError(
                f"TCPadeConfig.early_frac/late_frac must satisfy 0 <= early_frac <= late_frac <= 1, "
                f"got early_frac={self.early_frac!r}, late_frac={self.late_frac!r}"
            )
        self._check_schedule_fields(_bad)

    def _check_schedule_fields(self, bad) -> None:
        m = S.min_leading(self.predictor) if self.predictor in K.PREDICTORS else 1
        if self.predictor in K.CHOOSERS and self.input_correction not in (None, 0, 0.0):
            bad("input_correction", f"None or 0 with predictor={self.predictor!r} (its online choice measures "
                "the candidates without the input-change correction)", self.input_correction)
        if sum(x is not None for x in (self.schedule, self.passes, self.speedup)) > 1:
            bad("schedule/passes/speedup", "at most one of them set", (self.schedule, self.passes, self.speedup))
        if self.schedule is not None:
            t = self.schedule_steps
            if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
                bad("schedule_steps", "an int > 0 (the run length the schedule is for)", t)
            object.__setattr__(self, "schedule", S.check_schedule(self.schedule, t, self.predictor))
        elif self.schedule_steps is not None:
            bad("schedule_steps", "None without a schedule", self.schedule_steps)
        if self.passes is not None and (isinstance(self.passes, bool) or not isinstance(self.passes, int)
                                        or self.passes < m):  # fmt: skip
            bad("passes", f"an int >= {m} (the {self.predictor!r} predictor's minimum history)", self.passes)
        if self.speedup is not None and not (
            isinstance(self.speedup, (int, float)) and not isinstance(self.speedup, bool)
            and math.isfinite(self.speedup) and self.speedup >= 1.0
        ):  # fmt: skip
            bad("speedup", "a finite number >= 1", self.speedup)
        if not isinstance(self.use_calibrated, bool):
            bad("use_calibrated", "a bool", self.use_calibrated)
        cal = tuple((t, S.check_schedule(st, t, self.predictor, "calibrated")) for t, st in self.calibrated)
        object.__setattr__(self, "calibrated", cal)

    # ------------------------------------------------------------------- presets
    @classmethod
    def paper(cls, **overrides) -> "TCPadeConfig":
        """The published method as closely as docs/method.md sections 2-4 allow: paper
        predictor, TSI policy, warm-up 4, every 4th step and the last step computed,
        predictions stored in the history, input-change correction 0.2. At 20 steps
        this computes 9 of 20 calls (2.22x) when the TSI never blocks a skip."""
        base = dict(predictor="paper", policy="tsi", warmup=4, interval=4, final_steps=1, tsi_threshold=1.0,
                    max_skips=3, store_predictions=True, input_correction=None)  # fmt: skip
        base.update(overrides)
        return cls(**base)

    @classmethod
    def slow(cls, **overrides) -> "TCPadeConfig":
        """The 2.5x point: a compute budget of ``speedup=2.5`` (8 of 20 block-stack passes per
        branch, 11 of 28, 20 of 50), on the model's calibrated schedule when the registry has one
        (the zoo ships them; ``tcpade.calibrate`` makes them), else the spaced rule. Rational
        predictor, or the one the model's calibrations score best when it is calibrated for
        several (``calibrated_predictor``; a ``predictor=`` override turns that off). Short runs
        get more passes, so that the spaced rule never predicts more
        than 3 steps in a row (``budget_max_run=3``: 4 of 10, 3 of 6). Until this version
        ``slow()`` was the paper's 9-of-20 rule (warm-up 4, every 4th step, the last); on the zoo the calibrated 8-of-20 schedule gave 3-12 dB more with
        one pass fewer (bench/results/calibration.md). ``TCPadeConfig(policy="tsi", warmup=4,
        interval=4, final_steps=1, tsi_threshold=1.0)`` is the old rule."""
        base = dict(speedup=2.5, budget_max_run=3, calibrated_predictor="predictor" not in overrides)
        base.update(overrides)
        return cls.budget(**base)

    @classmethod
    def fast(cls, **overrides) -> "TCPadeConfig":
        """The 2.9x point: a compute budget of ``speedup=2.9`` (7 of 20 passes per branch, 10 of
        28, 17 of 50), placed like ``slow()``: the model's calibrated schedule, else the spaced
        rule, with at most 3 steps predicted in a row (4 of 10). The paper's "fast" point
        computes the same 7 of 20 as warm-up 2, every 6th and the last step (``TCPadeConfig(policy="tsi", warmup=2, interval=6, max_skips=5,
        final_steps=1, tsi_threshold=1.0)``); until this version ``fast()`` was warm-up 2, then
        every 4th step (``interval=4, max_skips=3, final_steps=0``)."""
        base = dict(speedup=2.9, budget_max_run=3, calibrated_predictor="predictor" not in overrides)
        base.update(overrides)
        return cls.budget(**base)

    @classmethod
    def adaptive(cls, **overrides) -> "TCPadeConfig":
        """Error-controlled skipping (docs/method.md section 7) with the rational predictor at
        tolerance 0.2: the compute adapts to the trajectory (on our trained models 10-11 of 20
        passes, 1.8-2.0x; 16 of 50, 3.1x) and it sits on the quality/compute Pareto front of
        the DiT and Wan zoo models at 20 steps (bench/results/quality.md)."""
        base = dict(predictor="rational", policy="error", warmup=2, tolerance=0.2, max_skips=3)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def budget(cls, passes: Optional[int] = None, speedup: Optional[float] = None, **overrides) -> "TCPadeConfig":
        """Exactly ``passes`` block-stack passes per branch at any step count T (or round(T /
        ``speedup``)), with the rational predictor. Placement: the model's calibrated schedule
        for (T, passes) when the registry holds one (shipped for the zoo, or ``tcpade.calibrate``),
        else the spaced rule (steps 0 and 1, then evenly spaced, the last step predicted;
        tcpade.policy.schedules.spaced). ``tcpade.summary`` says which was used."""
        if (passes is None) == (speedup is None):
            raise ValueError("TCPadeConfig.budget takes exactly one of passes=K or speedup=S")
        base = dict(predictor="rational", passes=passes, speedup=speedup)
        base.update(overrides)
        return cls(**base)

    @property
    def wants_calibrated(self) -> bool:
        """A budget that may take the model's calibrated schedule (``tcpade.apply`` looks it up)."""
        return self.use_calibrated and (self.passes is not None or self.speedup is not None)

    def budget_passes(self, total: int) -> Optional[int]:
        """The passes a budget config computes in a run of ``total`` steps, or None (no budget)."""
        m = S.min_leading(self.predictor)
        if self.passes is not None:
            k = min(self.passes, total)
        elif self.speedup is not None:
            k = min(total, max(m, int(math.floor(total / self.speedup + 0.5))))
        else:
            return None
        if self.budget_max_run is not None:
            k = max(k, S.min_passes(total, self.budget_max_run, m))
        return k

    def plan(self, total: int) -> Optional[Tuple[int, ...]]:
        """The computed steps of a ``total``-step run when they are fixed in advance (a schedule,
        a budget, or the TSI policy with a TSI that never blocks: every preset but
        ``adaptive()``), or None when the decisions depend on the trajectory (the error
        policy, a TSI threshold < 1)."""
        return self._plan(total)[0]

    def plan_source(self, total: int) -> str:
        """Where ``plan(total)`` comes from: "schedule", "calibrated", "spaced rule", "fixed rule"
        (the TSI policy's warm-up / interval / final steps with a TSI that never blocks) or
        "policy" (no plan: decided during the run)."""
        return self._plan(total)[1]

    def _plan(self, total: int):
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"total steps must be an int > 0, got {total!r}")
        if self.schedule is not None:
            if total != self.schedule_steps:
                raise ValueError(
                    f"TCPadeConfig.schedule is for schedule_steps={self.schedule_steps} steps, this run has "
                    f"{total}: use config.rescaled({total}), a budget (TCPadeConfig.budget), or calibrate for {total}"
                )
            return self.schedule, "schedule"
        k = self.budget_passes(total)
        if k is None:
            rule = self._rule_plan(total)
            return rule, ("policy" if rule is None else "fixed rule")
        for t, steps in self.calibrated:
            if t == total and len(steps) == k:
                return steps, "calibrated"
        return S.spaced(total, k, S.min_leading(self.predictor)), "spaced rule"

    def rescaled(self, total: int) -> "TCPadeConfig":
        """This config with its ``schedule`` moved to ``total`` steps, same pass count: the leading
        steps kept, every later step at the same fraction of the run."""
        import dataclasses

        if self.schedule is None:
            raise ValueError("TCPadeConfig.rescaled needs a schedule (TCPadeConfig.schedule is None)")
        steps = S.rescale(self.schedule, self.schedule_steps, total, S.min_leading(self.predictor))
        return dataclasses.replace(self, schedule=steps, schedule_steps=total)

    def always_computed(self, k: int, total: int) -> Optional[str]:
        """Why step k of ``total`` is computed whatever the history says, or None."""
        if k <= self.warmup:
            return "warmup"
        if k >= total - self.final_steps:
            return "final"
        if self.policy == "tsi" and self.interval > 0 and k % self.interval == 0:
            return "interval"
        return None

    def _rule_plan(self, total: int) -> Optional[Tuple[int, ...]]:
        """The steps the TSI policy's rule computes in a run of ``total`` steps, when they are
        known before it runs; None when the decisions depend on the trajectory (the error
        policy, a TSI threshold < 1, which can block a skip).

        Computed: the warm-up, every interval-th step, the final steps, a step after
        max_skips skips in a row, and every step while fewer residuals are stored than the
        predictor needs (stored predictions count, with store_predictions)."""
        if self.policy != "tsi" or self.tsi_threshold < 1.0:
            return None
        need = K.MIN_HISTORY[self.predictor]
        computed, stored, run = [], 0, 0
        for k in range(total):
            if self.always_computed(k, total) or self.max_skips == 0 or run >= self.max_skips or stored < need:
                computed.append(k)
                run, stored = 0, min(stored + 1, self.history_slots)
            else:
                run += 1
                if self.store_predictions:
                    stored = min(stored + 1, self.history_slots)
        return tuple(computed)
