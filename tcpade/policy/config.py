"""TCPadeConfig: every knob of the skip policy and the predictor, with presets.

The fields, by concern (``CONCERNS``; ``config.by_concern()`` shows a config that way):

* predictor: what a skipped call predicts and from what (``predictor``, ``level``,
  ``store_predictions``, ``input_correction``, ``early_frac``, ``late_frac``, ``pole_delta``,
  ``kappa``, ``history_slots``);
* policy: which steps are skipped when no schedule or budget fixes them (``policy``,
  ``warmup``, ``interval``, ``final_steps``, ``tsi_threshold``, ``tolerance``, ``max_skips``);
* schedule: the computed steps of a run of one length (``schedule``, ``schedule_steps``);
* budget: a number of computed steps at any run length (``passes``, ``speedup``,
  ``budget_max_run``, ``use_calibrated``, ``calibrated_predictor``).

Each field says what it does, its default, its allowed range, and which direction is
faster (fewer full block-stack passes). A bad value raises ValueError naming the field
and the allowed range: one table (``_CHECKS``) holds every field's check, and the
relations between fields, walked once by ``__post_init__``.

A config is what the user wrote and stays so: ``tcpade.apply`` keeps what it resolves for
a model (the calibrated schedules, each with its predictor) beside it, on
the runtime (``tcpade.policy.plan.Resolved``), and ``runtime.config`` is the object given.

Presets (bench/results/quality.md and calibration.md compare them with every peer on the
zoo's trained models): ``paper()`` reproduces the published method (for fidelity, not speed
or quality); ``slow()`` and ``fast()`` are compute budgets at 2.5x and 3x fewer block-stack
passes, rounded (8 and 7 of 20): on a model nobody calibrated, the spaced rule and linear extrapolation
on the step index; on a calibrated one (the zoo ships them), its calibrated schedules, each with the
predictor it was calibrated for; ``adaptive()`` is error-controlled skipping (its compute follows the trajectory).
The field defaults are the conservative end of ``adaptive()`` (tolerance 0.05: about 1.3x at
20 steps on those models).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from ..core import coef as K
from . import schedules as S
from .plan import Resolved

POLICIES = ("tsi", "error")
LEVELS = ("block", "output")
TIME_AXES = ("index", "schedule")
EXTRAPOLATE = ("residual", "h_out")

# concern -> its fields (the class docstring's sections)
CONCERNS = {
    "predictor": ("predictor", "level", "store_predictions", "input_correction", "early_frac", "late_frac",
                  "pole_delta", "kappa", "history_slots", "time_axis", "damping", "extrapolate"),
    "policy": ("policy", "warmup", "interval", "final_steps", "tsi_threshold", "tolerance", "max_skips"),
    "schedule": ("schedule", "schedule_steps"),
    "budget": ("passes", "speedup", "budget_max_run", "use_calibrated", "calibrated_predictor", "time_spacing"),
}  # fmt: skip


class ConfigTypeError(TypeError, ValueError):
    """A TCPadeConfig field got a value of the wrong type (the message names the field)."""


def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _str(v):
    return isinstance(v, str)


def _bool(v):
    return isinstance(v, bool)


def _sequence(v):
    return not isinstance(v, (str, bytes)) and hasattr(v, "__iter__")


def _opt(is_kind):
    return lambda v: v is None or is_kind(v)


def _finite(v):
    return math.isfinite(v)


class _Row(NamedTuple):
    """The check of one field: the type it takes (``kind``, tested by ``is_kind``), then the range
    allowed (``allowed``, tested by ``ok(value, config)``; either may read fields checked above
    it). A row named "a/b" is a relation between fields (its value: theirs), checked like a
    field's range."""

    kind: Optional[str]
    is_kind: Optional[Callable[[Any], bool]]
    allowed: Union[str, Callable[["TCPadeConfig"], str], None]
    ok: Optional[Callable[[Any, "TCPadeConfig"], bool]]


def _input_correction(c) -> str:
    if c.predictor in K.CHOOSERS:
        return (f"None or 0 with predictor={c.predictor!r} (its online choice measures the candidates without "
                "the input-change correction)")  # fmt: skip
    return "None or a finite number"


def _schedule_steps(c) -> str:
    return "an int > 0 (the run length the schedule is for)" if c.schedule is not None else "None without a schedule"


# One row per field (and per relation), in the order they are checked; ``__post_init__`` walks
# it twice: every type first, then every range.
_CHECKS: Dict[str, _Row] = {
    "predictor": _Row("a str", _str, f"one of {K.PREDICTORS}", lambda v, c: v in K.PREDICTORS),
    "level": _Row("a str", _str, f"one of {LEVELS}", lambda v, c: v in LEVELS),
    "store_predictions": _Row("a bool", _bool, None, None),
    "input_correction": _Row("None or a number", _opt(_real), _input_correction,
                             lambda v, c: v is None or (_finite(v) and (c.predictor not in K.CHOOSERS or v == 0))),
    "early_frac": _Row("a number", _real, "in [0, 1]", lambda v, c: 0.0 <= v <= 1.0),
    "late_frac": _Row("a number", _real, "in [0, 1]", lambda v, c: 0.0 <= v <= 1.0),
    "early_frac/late_frac": _Row(None, None, "ordered: 0 <= early_frac <= late_frac <= 1", lambda v, c: v[0] <= v[1]),
    "pole_delta": _Row("a number", _real, "in (0, 1)", lambda v, c: 0.0 < v < 1.0),
    "kappa": _Row("a number", _real, "a finite number >= 0", lambda v, c: _finite(v) and v >= 0.0),
    "history_slots": _Row("an int", _int, "an int >= 3", lambda v, c: v >= 3),
    "policy": _Row("a str", _str, f"one of {POLICIES}", lambda v, c: v in POLICIES),
    "warmup": _Row("an int", _int, ">= 0", lambda v, c: v >= 0),
    "interval": _Row("an int", _int, ">= 0", lambda v, c: v >= 0),
    "final_steps": _Row("an int", _int, ">= 0", lambda v, c: v >= 0),
    "tsi_threshold": _Row("a number", _real, "a number >= 0", lambda v, c: v >= 0.0),
    "tolerance": _Row("a number", _real, "a finite number > 0", lambda v, c: _finite(v) and v > 0.0),
    "max_skips": _Row("an int", _int, ">= 0", lambda v, c: v >= 0),
    "schedule_steps": _Row("None or an int", _opt(_int), _schedule_steps,
                           lambda v, c: v is None if c.schedule is None else v is not None and v > 0),
    "schedule": _Row("None or a sequence of ints", _opt(_sequence),
                     lambda c: S.schedule_problem(c.schedule, c.schedule_steps, c.predictor),
                     lambda v, c: v is None or S.schedule_problem(v, c.schedule_steps, c.predictor) is None),
    "passes": _Row("None or an int", _opt(_int),
                   lambda c: f"None or an int >= {K.MIN_HISTORY[c.predictor]} (the {c.predictor!r} predictor's "
                             "minimum history)",
                   lambda v, c: v is None or v >= K.MIN_HISTORY[c.predictor]),
    "speedup": _Row("None or a number", _opt(_real), "None or a finite number >= 1",
                    lambda v, c: v is None or (_finite(v) and v >= 1.0)),
    "budget_max_run": _Row("None or an int", _opt(_int), "None or an int >= 1", lambda v, c: v is None or v >= 1),
    "schedule/passes/speedup": _Row(None, None, "at most one of them set",
                                    lambda v, c: sum(x is not None for x in v) <= 1),
    "use_calibrated": _Row("a bool", _bool, None, None),
    "calibrated_predictor": _Row("a bool", _bool, None, None),
    "time_axis": _Row("a str", _str, f"one of {TIME_AXES}", lambda v, c: v in TIME_AXES),
    "time_spacing": _Row("a number", _real, "a finite number in [0, 1]", lambda v, c: _finite(v) and 0.0 <= v <= 1.0),
    "extrapolate": _Row("a str", _str, f"one of {EXTRAPOLATE}", lambda v, c: v in EXTRAPOLATE),
    "damping": _Row("a number", _real, lambda c: "a finite number >= 0, and 0 unless predictor is 'rational' or "
                    f"'linear' (predictor={c.predictor!r})",
                    lambda v, c: _finite(v) and v >= 0.0 and (v == 0.0 or c.predictor in ("rational", "linear"))),
}  # fmt: skip


def _check(c: "TCPadeConfig") -> None:
    """Raise on the first field of ``c`` whose type (ConfigTypeError: a TypeError, and a ValueError
    too, so ``except ValueError`` catches every bad config) or range (ValueError) is wrong; the
    message names the field and what it must be. ``schedule`` becomes a tuple in between."""
    for name, row in _CHECKS.items():
        v = getattr(c, name, None)
        if row.is_kind is not None and not row.is_kind(v):
            raise ConfigTypeError(f"TCPadeConfig.{name} must be {row.kind}, got {type(v).__name__} {v!r}")
    if c.schedule is not None:
        object.__setattr__(c, "schedule", tuple(c.schedule))
    for name, row in _CHECKS.items():
        names = name.split("/")
        v = tuple(getattr(c, n) for n in names) if len(names) > 1 else getattr(c, name)
        if row.ok is not None and not row.ok(v, c):
            allowed = row.allowed(c) if callable(row.allowed) else row.allowed
            got = ", ".join(f"{n}={x!r}" for n, x in zip(names, v)) if len(names) > 1 else repr(v)
            raise ValueError(f"TCPadeConfig.{name} must be {allowed}, got {got}")


@dataclass(frozen=True)
class TCPadeConfig:
    """Every knob of tcpade, by concern (the module docstring; ``by_concern``). Build one from
    keywords (``TCPadeConfig(predictor="linear", policy="error", tolerance=0.1)``) or from a
    preset (``paper``, ``slow``, ``fast``, ``adaptive``, ``budget``); frozen."""

    # ---- predictor: what a skipped call predicts, and from what (with the second predictor
    # section below; the two are apart to keep the fields' order, which positional arguments use)
    predictor: str = "rational"
    """How a skipped step's residual is predicted: "paper" (the published [2/1] form),
    "rational" (time-aware [1/1] Pade, docs/method.md section 5), "reuse" (last residual),
    "linear" (extrapolation along ``time_axis``) or "auto" (the candidate among rational,
    linear, linear damped toward the last residual at five strengths, and reuse whose errors
    on the run's computed steps so far, summed over the CFG branches, are the smallest: one
    more memory pass on each computed step).
    Not a speed knob: every predictor is one memory pass per skipped step."""

    level: str = "block"
    """What a skipped call predicts. "block": the residual h_out - h_in of the block stack; the
    embeddings before the stack and the output norm / projection after it run on every call.
    "output": what the transformer returns (its noise or velocity prediction), extrapolated
    from the branch's last computed outputs, as diffusers' TaylorSeer "lite" mode does; a
    skipped call runs nothing of the transformer (docs/method.md section 12). Which is more
    faithful depends on the model (bench/results/output_level.md); "output" skips slightly
    more work per skipped call."""

    # ---- policy: which steps are skipped (when no schedule or budget fixes them)
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

    # ---- predictor, continued: the history it predicts from and its coefficients
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

    # ---- schedule: the computed steps of a run of one length, given
    schedule: Optional[Tuple[int, ...]] = None
    """A fixed schedule: the steps (0-based, sorted) computed in a run of ``schedule_steps``
    steps; every other step is skipped and predicted, whatever ``policy``, ``warmup``,
    ``interval``, ``final_steps`` and ``max_skips`` say. It must start with the steps the
    predictor needs before its first skip (step 0; the paper's predictor: 0 and 1), so the pass count is exact
    (only a non-finite value forces more). A run of another length raises ValueError: use
    ``rescaled(T)`` or ``budget(...)``. Fewer steps = faster."""

    schedule_steps: Optional[int] = None
    """The run length T that ``schedule`` is for (required with it)."""

    # ---- budget: a number of computed steps at any run length, placed for the model
    passes: Optional[int] = None
    """A compute budget (``budget(passes=K)``): exactly min(K, T) computed steps per branch at
    any T, placed by the model's calibrated schedule when one matches, else the spaced rule
    (tcpade.policy.schedules). >= the predictor's minimum history (2; reuse 1). Fewer = faster."""

    speedup: Optional[float] = None
    """A compute budget as a ratio (``budget(speedup=S)``): round(T / S) passes, at least the
    predictor's minimum history (>= 1). Larger = faster."""

    budget_max_run: Optional[int] = None
    """A budget's guard for short runs: the spaced rule predicts at most this many steps in a
    row. A pass count from ``speedup`` is raised until it does (e.g. ``slow()`` / ``fast()`` at
    7 steps: 3 passes, not 2); an explicit ``passes=K`` is kept, and where K is too few for this
    cap the spaced rule is placed as it is, without a cut (on the zoo's three shifted schedules
    the cut that 12 of 50 allows, to 4 in a row, lost 0.8 dB on average:
    bench/research/time_spaced). None = no guard.
    Smaller = more passes at short T (slower, safer)."""

    use_calibrated: bool = True
    """A budget takes the model's calibrated schedule for (T, passes) when the registry has one
    (False: always the spaced rule). Not a speed knob."""

    calibrated_predictor: bool = False
    """A budget takes the calibrated schedules of every predictor the model is calibrated for
    (the zoo ships rational and linear for every model, reuse for one), at each (T, passes) the
    one whose held-out check beat the spaced rule by the most, and runs it with its own
    predictor; ``predictor`` runs where no calibrated schedule does (the spaced rule).
    ``tcpade.apply`` decides and keeps the choice on the runtime (``runtime.resolved``; this
    config is not changed); the summary shows it. ``slow()`` and ``fast()`` set it unless given
    a predictor. Not a speed knob."""

    # ---- predictor, continued (fields added later, kept last so positional arguments keep working)
    time_axis: str = "index"
    """The axis the rational and linear predictors extrapolate along: "index" (the step index,
    as diffusers' TaylorSeer does) or "schedule" (the scheduler's times: sigma for flow-matching
    models, the timestep for DDPM-style ones). "index" measured better on the zoo models (a
    shifted flow schedule's last gaps in sigma are its longest ones, and extrapolating across
    them overshoots); "schedule" was the only axis before. Not a speed knob."""

    damping: float = 0.0
    """rational and linear: pull every prediction toward the newest residual R1 as the gap it
    crosses grows, R_hat <- d R_hat + (1 - d) R1 with d = 1 / (1 + damping * g), g = how far
    the predicted step lies past R1 in units of the spacing of the last two stored residuals
    (on ``time_axis``). 0 = off (>= 0). Larger = closer to reuse on long gaps. "auto" chooses
    its damping online. Not a speed knob."""

    extrapolate: str = "residual"
    """level "block": what the predictor extrapolates from the computed steps. "residual": the
    block stack's residual h_out - h_in, added to the skipped call's own h_in (the paper's form).
    "h_out": the stack's output h_out itself, the skipped call's h_in unused (what diffusers'
    TaylorSeer does per block). Which is more faithful depends on the model: on the zoo "h_out"
    measured better on one model of six and the residual better on average
    (bench/results/defaults.md). At level "output" the transformer's output is extrapolated
    either way. Not a speed knob."""

    # ---- budget, continued
    time_spacing: float = S.SPACED_TIME_WEIGHT
    """The spaced rule (a budget without a calibrated schedule): how far its computed steps are
    spaced evenly on the run's time (the scheduler's timesteps) rather than on the step index,
    0 .. 1 (``tcpade.policy.schedules.spaced``'s ``time_weight``). A shifted flow-matching
    schedule (FLUX, Wan, SD3) moves fastest at its end, so more steps are computed there; a
    schedule even in the step index (DDIM, an unshifted one) is not changed. 0.5 measured best
    leave-one-model-out on the zoo models (bench/results/defaults.md); 0 is the rule on the step
    index alone (until this version). The run's times come from the pipeline's scheduler or
    ``tcpade.sample``'s loop; a bare transformer with ``num_steps`` runs the rule on the step
    index. ``config.plan(T)`` (no times) shows the rule on the step index; ``config.plan(T, times)``
    and ``tcpade.summary`` the steps a run computes. Not a speed knob."""

    def __post_init__(self):
        _check(self)

    def by_concern(self) -> Dict[str, Dict[str, Any]]:
        """The fields, grouped by concern (``CONCERNS``): {"predictor": {...}, "policy": {...}, ...}."""
        return {concern: {n: getattr(self, n) for n in names} for concern, names in CONCERNS.items()}

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
        (the zoo ships them; ``tcpade.calibrate`` makes them), else the spaced rule. Predictor
        "linear" (on the step index) on a model nobody calibrated (the rule and the predictor chosen
        leave-one-model-out on the zoo models: bench/results/defaults.md); on a calibrated model's
        calibrated schedule the predictor that schedule was calibrated for (``calibrated_predictor``;
        a ``predictor=`` override turns that off). Short runs get more passes, so that the spaced rule never predicts
        more than 3 steps in a row (``budget_max_run=3``: 3 of 7, not 2). Until this version
        ``slow()`` was the paper's 9-of-20 rule (warm-up 4, every 4th step, the last); on the zoo
        the calibrated 8-of-20 schedule gave 3-12 dB more with one pass fewer
        (bench/results/calibration.md). ``TCPadeConfig(policy="tsi", warmup=4, interval=4,
        final_steps=1, tsi_threshold=1.0)`` is the old rule. ``slow(speedup=2)`` is the same
        budget at another level (10 of 20: the benchmark's 2x point); ``slow(passes=K)`` computes
        exactly K per branch at every step count T >= K (where K cannot keep 3 steps in a row,
        the spaced rule uncapped: ``budget_max_run``)."""
        return cls._preset_budget(2.5, overrides)

    @classmethod
    def fast(cls, **overrides) -> "TCPadeConfig":
        """The fast point: a compute budget of ``speedup=3`` (rounded to the nearest pass count: 7 of
        20 passes per branch (2.86x), 9 of 28 (3.11x), 17 of 50 (2.94x), 3 of 10 (3.33x); at least
        2.86x at each of them), placed like ``slow()``: the model's calibrated schedule, else the
        spaced rule, with at most 3 steps predicted in a row, and the same predictor. (Until this
        version ``speedup=2.9``: the same pass counts but 10 of 28, 2.8x.) The paper's "fast" point
        computes the same 7 of 20 as warm-up 2, every 6th and the last step
        (``TCPadeConfig(policy="tsi", warmup=2, interval=6, max_skips=5, final_steps=1,
        tsi_threshold=1.0)``); until this version ``fast()`` was warm-up 2, then
        every 4th step (``interval=4, max_skips=3, final_steps=0``). ``fast(speedup=S)`` or
        ``fast(passes=K)`` is the same preset at another level (an explicit K is kept, as in
        ``slow(passes=K)``: ``fast(passes=12)`` is 4.17x at 50 steps, where no speedup gives
        fewer than 13 passes under the 3-in-a-row guard)."""
        return cls._preset_budget(3.0, overrides)

    @classmethod
    def _preset_budget(cls, speedup: float, overrides: dict) -> "TCPadeConfig":
        """``slow()`` / ``fast()``: the budget at ``speedup`` with the presets' guard and predictor;
        ``passes=K`` in ``overrides`` replaces the speedup (a budget takes one of the two)."""
        base = dict(speedup=speedup, budget_max_run=S.PRESET_MAX_RUN, predictor=S.SPACED_PREDICTOR,
                    calibrated_predictor="predictor" not in overrides)  # fmt: skip
        if overrides.get("passes") is not None and "speedup" not in overrides:
            del base["speedup"]
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
        else the spaced rule (step 0, then evenly spaced, the last step predicted; steps 0 and 1
        first for the paper's predictor; tcpade.policy.schedules.spaced). ``tcpade.summary`` says which was used."""
        if (passes is None) == (speedup is None):
            raise ValueError("TCPadeConfig.budget takes exactly one of passes=K or speedup=S")
        base = dict(predictor="rational", passes=passes, speedup=speedup)
        base.update(overrides)
        return cls(**base)

    @property
    def wants_calibrated(self) -> bool:
        """A budget that may take the model's calibrated schedule (``tcpade.apply`` looks it up)."""
        return self.use_calibrated and (self.passes is not None or self.speedup is not None)

    # The plan of this config alone (no model: no calibrated schedule, the config's predictor).
    # A runtime asks its ``resolved`` instead (``tcpade.policy.plan.Resolved``).
    def budget_passes(self, total: int) -> Optional[int]:
        """The passes a budget config computes in a run of ``total`` steps, or None (no budget)."""
        return Resolved(self).budget_passes(total)

    def plan(self, total: int, times=None) -> Optional[Tuple[int, ...]]:
        """The computed steps of a ``total``-step run when they are fixed in advance (a schedule,
        a budget, or the TSI policy with a TSI that never blocks: every preset but
        ``adaptive()``), or None when the decisions depend on the trajectory (the error
        policy, a TSI threshold < 1). ``times``: the run's time per step (the scheduler's
        timesteps), which the spaced rule places its steps on (``time_spacing``); without them
        the rule on the step index."""
        return Resolved(self).plan(total, times)

    def plan_source(self, total: int, times=None) -> str:
        """Where ``plan(total)`` comes from: "schedule", "calibrated", "spaced rule", "fixed rule"
        (the TSI policy's warm-up / interval / final steps with a TSI that never blocks) or
        "policy" (no plan: decided during the run)."""
        return Resolved(self).plan_source(total, times)

    def rescaled(self, total: int) -> "TCPadeConfig":
        """This config with its ``schedule`` moved to ``total`` steps, same pass count: the leading
        steps kept, every later step at the same fraction of the run."""
        if self.schedule is None:
            raise ValueError("TCPadeConfig.rescaled needs a schedule (TCPadeConfig.schedule is None)")
        steps = S.rescale(self.schedule, self.schedule_steps, total, K.MIN_HISTORY[self.predictor])
        return dataclasses.replace(self, schedule=steps, schedule_steps=total)
