"""Fixed compute schedules: which steps of a T-step run compute the block stack.

A schedule is a sorted tuple of step indices (0-based) that are computed; every other step
is skipped and its residual predicted. Three things make one:

* ``TCPadeConfig(schedule=..., schedule_steps=T)``: given by hand (or by ``tcpade.calibrate``)
  for exactly T steps;
* ``TCPadeConfig.budget(passes=K)`` / ``budget(speedup=S)``: K computed steps at any T, placed
  by the model's calibrated schedule for (T, K) when the registry has one, else by the spaced
  rule below;
* the registry: calibrated schedules keyed by the transformer class, a hash of its config, the
  predictor and T, shipped with the zoo (``tcpade/zoo/schedules.json``) or loaded by the user
  (``load``); ``tcpade.apply`` looks the model up once (``resolve``) and keeps the matches on
  the runtime beside the config (``tcpade.policy.plan.Resolved``, whose ``plan(T)`` chooses
  among them), never in it. With ``calibrated_predictor`` (``slow()`` / ``fast()``) a model
  calibrated for several predictors runs, at each (T, passes), the schedule of the predictor
  whose calibration beat the spaced rule on held-out inputs by the most, with that predictor
  (``best_schedules``).

A calibrated schedule may come with its held-out check (``tcpade.calibrate``'s validation): its
mean PSNR and the spaced rule's on inputs the search did not see. The registry uses it only
where it beats the spaced rule there (``wins``); one that lost is kept out (its check is kept,
so that ``tcpade.summary`` can say why the spaced rule ran). A schedule without a check (a file
of format version 1, or a calibration run with validation turned off) is used, marked
unvalidated.

The spaced rule: steps 0 .. m-1 (m = ``tcpade.core.coef.MIN_HISTORY[predictor]``, the
residuals the predictor needs before its first skip: 1, the paper's 2; the first skips after a
single residual reuse it) and then the remaining passes evenly spaced from step 0 on, the last
one ``SPACED_END`` steps before the end (the final step predicted), e.g. 8 of 20 -> 0 3 5 8 10
13 15 18, 7 of 20 -> 0 3 6 9 12 15 18, 3 of 10 -> 0 4 8. (Until this version it computed
steps 0 and 1 first for every predictor: 0 1 3 6 9 12 15 18; one residual first measured
better on the zoo models, bench/results/defaults.md.) "Evenly spaced" is on a blend of the step
index and the run's time (``spaced``'s ``times`` and ``time_weight``, ``TCPadeConfig.time_spacing``,
default ``SPACED_TIME_WEIGHT``) where the runtime knows the run's times: on a shifted
flow-matching schedule (time moving fastest at the end) 8 of 20 become 0 4 7 10 12 15 16 18 at
shift 3; where the time moves evenly with the step index nothing changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
from typing import Dict, Optional, Sequence, Tuple

from ..core import coef as K
from ..core import layout as L

log = logging.getLogger(__name__)

__all__ = [
    "SHIPPED",
    "best_schedules",
    "cap_runs",
    "carry",
    "check_schedule",
    "checks",
    "clear",
    "even_family",
    "longest_skip_run",
    "min_passes",
    "load",
    "lookup",
    "model_key",
    "register",
    "rescale",
    "resolve",
    "schedule_problem",
    "spaced",
    "time_axis_weights",
    "wins",
]

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo", "schedules.json")
# The spaced rule: steps 0..SPACED_WARMUP-1 (at least the predictor's minimum history), and its
# last computed step SPACED_END steps before the end of the run.
SPACED_WARMUP = 1
# The predictor slow() / fast() run the spaced rule with (the rule and the predictor were chosen
# together, leave-one-model-out on the zoo models); a calibrated schedule's held-out check is made
# against the spaced rule with it (tcpade.calibrate.validate), what those presets run instead.
SPACED_PREDICTOR = "linear"
SPACED_END = 1
# The spaced rule's weight of the run's time against the step index (``spaced``'s time_weight, the
# default of TCPadeConfig.time_spacing): chosen leave-one-model-out on the zoo models.
SPACED_TIME_WEIGHT = 0.5
# slow() / fast(): at most this many steps predicted in a row (their budget_max_run)
PRESET_MAX_RUN = 3
FORMAT_VERSION = 2  # version 2 added the held-out checks
READ_VERSIONS = (1, 2)  # version 1 files load, their schedules unvalidated


def schedule_problem(steps, total: int, predictor: str) -> Optional[str]:
    """What ``steps`` must be, as a schedule of ``total`` steps for ``predictor``, when it is not
    (the phrase after "must be" in the error); None when it is a valid schedule."""
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
        return "a sequence of step indices"
    steps = tuple(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
        return "a non-empty sequence of ints"
    if any(b <= a for a, b in zip(steps, steps[1:])):
        return "strictly increasing (sorted, no repeats)"
    if steps[0] < 0 or steps[-1] >= total:
        return f"steps in [0, {total - 1}] for {total} steps"
    m = K.MIN_HISTORY[predictor]
    if steps[:m] != tuple(range(m)):
        need = "step 0" if m == 1 else f"steps 0..{m - 1}"
        return (f"steps that start with {need} (the {predictor!r} predictor needs {m} stored residual(s) "
                "before its first skip)")  # fmt: skip
    return None


def check_schedule(steps, total, predictor: str, name: str = "schedule") -> Tuple[int, ...]:
    """``steps`` as a tuple of ints after validation against ``total`` steps, or ValueError
    naming ``TCPadeConfig.<name>``."""
    if not isinstance(steps, (str, bytes)) and hasattr(steps, "__iter__"):
        steps = tuple(steps)
    problem = schedule_problem(steps, total, predictor)
    if problem is not None:
        raise ValueError(f"TCPadeConfig.{name} must be {problem}, got {steps!r}")
    return steps


def _fit(positions: Sequence[float], lead: int, total: int) -> Tuple[int, ...]:
    """Steps 0..lead-1, then ``positions`` rounded to distinct ints in [lead, total - 1], in order."""
    n = len(positions)
    out = list(range(lead))
    for i, x in enumerate(positions):
        lo = out[-1] + 1 if out else 0
        hi = total - (n - i)  # room for the ones after it
        out.append(min(max(int(round(x)), lo), hi))
    return tuple(out)


def spaced(total: int, passes: int, lead: int = 1, end: int = None, warmup: int = None, times=None,
           time_weight: float = 0.0) -> Tuple[int, ...]:  # fmt: skip
    """The spaced rule: ``passes`` computed steps of ``total``: 0..w-1 (w = max(lead, ``warmup``)),
    then the rest evenly spaced counted from step 0, the last one ``end`` steps before the final
    step (fewer when the gaps get that short). Defaults: SPACED_END, SPACED_WARMUP.

    ``times`` (the run's time per step, the scheduler's timesteps or sigmas, strictly monotonic)
    and ``time_weight`` a in [0, 1]: the steps are evenly spaced on
    w(k) = (1 - a) k / (T - 1) + a (t_0 - t_k) / (t_0 - t_{T-1}) instead of on the step index k
    (``time_axis_weights``): a shifted flow-matching schedule, whose time moves fastest at the
    end, gets more of its computed steps there. a = 0, no ``times``, or times that move evenly
    with k (DDIM's, an unshifted flow-matching schedule's) give the plain rule."""
    weights = time_axis_weights(times, total, time_weight)
    return _spaced(total, passes, lead, end, warmup, weights)


def time_axis_weights(times, total: int, time_weight: float) -> Optional[Tuple[float, ...]]:
    """w(0..T-1) of ``spaced`` (0 .. 1, strictly increasing), or None where it is the step index
    itself (no ``times``, ``time_weight`` 0, or times evenly spaced in k to 1e-6). ``times`` of
    another length than ``total``, not finite or not strictly monotonic: ValueError."""
    if not (isinstance(time_weight, numbers.Real) and not isinstance(time_weight, bool)
            and math.isfinite(time_weight) and 0.0 <= time_weight <= 1.0):  # fmt: skip
        raise ValueError(f"time_weight must be a number in [0, 1], got {time_weight!r}")
    time_weight = float(time_weight)
    if times is None or time_weight == 0.0 or total < 3:
        return None
    t = [float(x) for x in times]
    problem = times_problem(t, total)
    if problem:
        raise ValueError(problem)
    span = t[0] - t[-1]
    w = [(1.0 - time_weight) * k / (total - 1) + time_weight * (t[0] - t[k]) / span for k in range(total)]
    if all(abs(w[k] - k / (total - 1)) < 1e-6 for k in range(total)):  # (float32 timesteps: ~5e-8 off)
        return None
    return tuple(w)


def times_problem(times: Sequence[float], total: int) -> Optional[str]:
    """What is wrong with ``times`` as a run's time per step for ``spaced`` (one per step, finite,
    strictly monotonic), or None."""
    if len(times) != total:
        return f"times must have one entry per step ({total}), got {len(times)}"
    d = [b - a for a, b in zip(times, times[1:])]
    if not all(math.isfinite(x) for x in times) or not (all(x < 0 for x in d) or all(x > 0 for x in d)):
        return f"times must be finite and strictly monotonic, got {list(times)!r}"
    return None


@functools.lru_cache(maxsize=256)
def _spaced(total, passes, lead, end, warmup, weights) -> Tuple[int, ...]:
    end = SPACED_END if end is None else end
    warmup = SPACED_WARMUP if warmup is None else warmup
    if passes >= total:
        return tuple(range(total))
    lead = min(max(lead, warmup), passes)
    r = passes - lead
    if r == 0:
        return tuple(range(lead))
    # Spaced from step 0 (the steps after it are the warm-up): at 20 steps, 8 passes -> gap 3.
    last = max(lead - 1 + r, total - 1 - end)
    gap = last / r
    if weights is None:
        return _fit([gap * (i + 1) for i in range(r)], lead, total)
    # the same count evenly on w from w(0) to w(last), back to step indices; where they crowd (more
    # than one per step) the earlier ones give way, so the last computed step stays ``last``
    w_last = weights[last]
    steps = [int(round(_inverse(weights, w_last * (i + 1) / r))) for i in range(r)]
    steps[-1] = min(steps[-1], last)
    for i in range(r - 2, -1, -1):
        steps[i] = min(steps[i], steps[i + 1] - 1)
    for i in range(r):
        steps[i] = max(steps[i], (steps[i - 1] + 1) if i else lead)
    return tuple(range(lead)) + tuple(steps)


def cap_runs(steps: Sequence[int], max_run: int) -> Tuple[int, ...]:
    """``steps`` with every run of predicted steps between two computed ones cut to ``max_run``:
    from the start, a computed step further than ``max_run + 1`` after the previous one moves back
    to ``previous + max_run + 1`` (the count and the first step stay; nothing moves later). The
    spaced rule on the run's times (its steps crowd toward the end) under a budget's
    ``budget_max_run``, whose pass count is already enough for the rule on the step index to keep
    the run: its last step then stays too (tests/test_schedule.py checks the presets)."""
    out = [int(steps[0])]
    for x in steps[1:]:
        out.append(max(out[-1] + 1, min(int(x), out[-1] + max_run + 1)))
    return tuple(out)


def _inverse(w: Sequence[float], value: float) -> float:
    """The fractional step k at which the piecewise-linear w(k) (increasing) equals ``value``."""
    for k in range(len(w) - 1):
        if value <= w[k + 1]:
            return k + (value - w[k]) / (w[k + 1] - w[k])
    return float(len(w) - 1)


def longest_skip_run(steps: Sequence[int], total: int) -> int:
    """The most consecutive steps a schedule of ``total`` steps leaves predicted."""
    edges = [-1, *steps, total]
    return max(b - a - 1 for a, b in zip(edges, edges[1:]))


def min_passes(total: int, max_run: int, lead: int = 1) -> int:
    """The fewest passes whose spaced-rule schedule predicts at most ``max_run`` steps in a row."""
    for k in range(min(lead, total), total + 1):
        if longest_skip_run(spaced(total, k, lead), total) <= max_run:
            return k
    return total


def even_family(total: int, passes: int, lead: int = 1) -> Tuple[Tuple[int, ...], ...]:
    """Evenly spaced schedules with ``passes`` steps: steps 0..w-1 (w = lead or lead + 1), then a
    constant gap counted from step 0, the last ``e`` = 0, 1 or 2 steps predicted (e below the gap).
    The spaced rule is one of them (w = lead, e = SPACED_END)."""
    if passes >= total:
        return (tuple(range(total)),)
    out = set()
    for w in (lead, lead + 1):
        r = passes - w
        if r < 1:
            continue
        for e in range(3):
            gap = (total - 1 - e) / r
            if gap >= 1 and e < gap:
                out.add(_fit([gap * (i + 1) for i in range(r)], w, total))
    out.add(spaced(total, passes, lead))  # (with the default constants it is one of the above)
    return tuple(sorted(out))


def rescale(steps: Sequence[int], from_total: int, total: int, lead: int = 1) -> Tuple[int, ...]:
    """A schedule for ``from_total`` steps moved to ``total`` steps with the same pass count:
    steps 0..lead-1 kept, every later step at the same fraction of the run."""
    steps = tuple(steps)
    if len(steps) > total:
        raise ValueError(f"a schedule of {len(steps)} passes cannot be rescaled to {total} steps")
    lead = min(lead, len(steps))
    rest = steps[lead:]
    return _fit([s * (total - 1) / max(from_total - 1, 1) for s in rest], lead, total)


def carry(steps: Sequence[int], from_axis: Sequence[float], to_axis: Sequence[float], passes: Optional[int] = None,
          lead: int = 1, keep_end: bool = False) -> Tuple[int, ...]:  # fmt: skip
    """A schedule of ``len(from_axis)`` steps carried to ``len(to_axis)`` steps along a time axis
    (per step, the scheduler's sigma or timestep of each run; monotonic): steps 0..lead-1 kept,
    the others placed where the source places them on the axis, each at the target step whose
    axis value is nearest. ``passes`` (default: the source's pass count scaled by T'/T, rounded,
    in [lead, T']): with as many passes as the source each computed step moves to its nearest
    target step; with more or fewer they follow the source's density along the axis (the
    cumulative count of its computed steps, interpolated between them, sampled at equal parts),
    the last one where the source's last one is. ``keep_end``: the last computed step instead
    as many steps before the end as the source's (the nearest step on the axis may be another
    one: at 10 steps the source's step 18 of 20 is nearest to the final step 9)."""
    steps = tuple(int(x) for x in steps)
    src, dst = [float(x) for x in from_axis], [float(x) for x in to_axis]
    total = len(dst)
    if problem := schedule_problem(steps, len(src), "reuse"):
        raise ValueError(f"carry: steps must be {problem}, got {steps!r}")
    lead = min(lead, len(steps))
    if steps[:lead] != tuple(range(lead)):
        raise ValueError(f"carry: steps must start with steps 0..{lead - 1}, got {steps!r}")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int)):
        raise ValueError(f"carry: passes must be an int, got {passes!r}")
    k = int(math.floor(len(steps) * total / len(src) + 0.5)) if passes is None else passes
    k = min(max(k, lead), total)
    r_src, r = len(steps) - lead, k - lead
    if r <= 0 or r_src <= 0:
        return _fit([], lead, total) if r <= 0 else spaced(total, k, lead)
    # the source's computed steps on the axis, from the last leading step (cumulative count 0) on
    pos = [src[s] for s in steps[lead - 1 :]] if lead else [src[0]] + [src[s] for s in steps]
    targets = []
    for j in range(r):
        q = (j + 1) * r_src / r  # cumulative count of the source, in (0, r_src]
        i = min(int(math.floor(q)), r_src - 1)
        u = pos[i] + (q - i) * (pos[i + 1] - pos[i])
        targets.append(min(range(total), key=lambda t: (abs(dst[t] - u), t)))
    if keep_end:  # the last computed step as far from the end as the source's
        cap = total - 1 - (len(src) - 1 - steps[-1])
        targets[-1] = cap
        targets = [min(x, cap - (r - 1 - j)) for j, x in enumerate(targets)]
    return _fit(targets, lead, total)


def run_fraction(total: int) -> Tuple[float, ...]:
    """The axis of ``carry`` when the scheduler is not known: each step's fraction of the run."""
    return tuple(k / max(total - 1, 1) for k in range(total))


# ------------------------------------------------------------------------------------ registry
def model_key(transformer) -> str:
    """``<class name>:<12 hex digits>`` of the transformer's diffusers config (architecture only:
    two models with the same config and other weights share the key)."""
    config = getattr(transformer, "config", None)
    items = dict(config) if config is not None else {}
    items = {k: v for k, v in items.items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=repr).encode()
    return f"{type(transformer).__name__}:{hashlib.sha256(blob).hexdigest()[:12]}"


# key -> predictor -> T -> passes -> steps (the schedules in use); the same -> calibration PSNR,
# where known; the same -> held-out check (calibrated dB, spaced rule dB), where one was made
# (the schedules that lost it included: they are not in _REGISTRY)
_REGISTRY: Dict[str, Dict[str, Dict[int, Dict[int, Tuple[int, ...]]]]] = {}
_PSNR: Dict[str, Dict[str, Dict[int, Dict[int, float]]]] = {}
_CHECKS: Dict[str, Dict[str, Dict[int, Dict[int, Tuple[float, float]]]]] = {}
_SHIPPED_LOADED = False


def wins(check: Optional[Tuple[float, float]]) -> bool:
    """Whether a calibrated schedule with this held-out check is used: ``(calibrated dB, spaced rule
    dB)`` on the held-out inputs, used when strictly higher (a tie leaves the spaced rule, which
    is the same schedule or as good); None (never checked) is used, unvalidated."""
    if check is None:
        return True
    cal, spaced = check
    return float(cal) > float(spaced)


def _check_pair(p, value) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    try:
        cal, spaced = (float(v) for v in value)
    except (TypeError, ValueError):
        what = "must be (calibrated dB, spaced rule dB)"
        raise ValueError(f"held-out check for {p} passes {what}, got {value!r}") from None
    return cal, spaced


def register(key: str, predictor: str, total: int, schedules: Dict[int, Sequence[int]],
             psnr: Optional[Dict[int, float]] = None,
             validation: Optional[Dict[int, Optional[Tuple[float, float]]]] = None) -> None:  # fmt: skip
    """Add calibrated schedules ({passes: steps}) for model ``key``, ``predictor`` and ``total`` steps
    (replacing earlier ones for the same passes), with their calibration PSNR ({passes: dB}) when
    known (``best_schedules`` ranks unvalidated schedules by it) and their held-out checks ({passes:
    (calibrated dB, spaced rule dB)}; a pass count not in it, or ``validation`` None: unvalidated).
    A schedule that lost its check is not used: the budget presets keep the spaced rule at that
    pass count (``wins``)."""
    _load_shipped()
    slot = _REGISTRY.setdefault(key, {}).setdefault(predictor, {}).setdefault(int(total), {})
    scores = _PSNR.setdefault(key, {}).setdefault(predictor, {}).setdefault(int(total), {})
    checked = _CHECKS.setdefault(key, {}).setdefault(predictor, {}).setdefault(int(total), {})
    for p, steps in schedules.items():
        steps = check_schedule(steps, int(total), predictor)
        if len(steps) != int(p):
            raise ValueError(f"calibrated schedule for {p} passes has {len(steps)} steps: {steps}")
        check = _check_pair(p, (validation or {}).get(int(p)))
        if check is None:
            checked.pop(int(p), None)
        else:
            checked[int(p)] = check
        if wins(check):
            slot[int(p)] = steps
        else:
            slot.pop(int(p), None)
        value = None if psnr is None else psnr.get(int(p))
        if value is None:
            scores.pop(int(p), None)
        else:
            scores[int(p)] = float(value)


def _standing(key: str, predictor: str, total: int, passes: int) -> tuple:
    """How a calibrated schedule in use ranks against another predictor's for the same (T, passes):
    validated ones first, by their held-out margin over the spaced rule; unvalidated ones after,
    by their calibration PSNR (unknown: last)."""
    check = _CHECKS.get(key, {}).get(predictor, {}).get(total, {}).get(passes)
    if check is not None:
        return (1, check[0] - check[1])
    psnr = _PSNR.get(key, {}).get(predictor, {}).get(total, {}).get(passes)
    return (0, -math.inf if psnr is None else psnr)


def best_schedules(transformer) -> Tuple[Tuple[int, Tuple[int, ...], str], ...]:
    """The model's calibrated schedules across the predictors it is calibrated for, one per (T,
    passes), as ((T, steps, predictor), ...): where several predictors have a schedule in use
    there, the one whose held-out check beat the spaced rule by the most (a validated schedule
    before an unvalidated one; unvalidated ones by calibration PSNR; ties: the first predictor by name)."""
    _load_shipped()
    key = model_key(transformer)
    best: Dict[Tuple[int, int], Tuple[tuple, str, Tuple[int, ...]]] = {}
    for predictor, by_t in sorted(_REGISTRY.get(key, {}).items()):
        for t, by_p in by_t.items():
            for p, steps in by_p.items():
                rank = _standing(key, predictor, t, p)
                if (t, p) not in best or rank > best[(t, p)][0]:
                    best[(t, p)] = (rank, predictor, steps)
    return tuple((t, best[(t, p)][2], best[(t, p)][1]) for t, p in sorted(best))


def entries_from_json(doc: dict) -> list:
    """The entries of a schedules JSON document, version-checked."""
    if not isinstance(doc, dict) or doc.get("format") != "tcpade-schedules":
        raise ValueError(f"not a tcpade schedules file (format tcpade-schedules, version {FORMAT_VERSION})")
    if doc.get("version") not in READ_VERSIONS:
        raise ValueError(f"a tcpade schedules file of version {doc.get('version')!r}: this tcpade reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}")  # fmt: skip
    return doc["entries"]


def entry_checks(entry: dict) -> Optional[Dict[int, Tuple[float, float]]]:
    """The held-out checks of a schedules file entry ({passes: (calibrated dB, spaced rule dB)}), or
    None when it was not validated (a version 1 entry, or validation turned off)."""
    v = entry.get("validation")
    if not entry.get("validated", False) or not v:
        return None
    return {int(p): (float(c["calibrated"]), float(c["spaced"])) for p, c in v.get("passes", {}).items()}


def load(path: str) -> int:
    """Register every schedule of a JSON file written by ``tcpade.calibrate.save`` (those that lost
    their held-out check are kept out); returns how many the file has."""
    with open(path) as f:
        entries = entries_from_json(json.load(f))
    n = 0
    for e in entries:
        register(e["model"], e["predictor"], e["steps"], {int(p): s for p, s in e["schedules"].items()},
                 {int(p): v for p, v in e.get("psnr", {}).items()}, entry_checks(e))  # fmt: skip
        n += len(e["schedules"])
    return n


def _load_shipped() -> None:
    global _SHIPPED_LOADED
    if _SHIPPED_LOADED:
        return
    _SHIPPED_LOADED = True
    if os.path.exists(SHIPPED):
        load(SHIPPED)


def clear(shipped: bool = True) -> None:
    """Forget registered schedules (``shipped=True``: the zoo's come back on the next lookup;
    ``False``: they stay out too)."""
    global _SHIPPED_LOADED
    _REGISTRY.clear()
    _PSNR.clear()
    _CHECKS.clear()
    _SHIPPED_LOADED = not shipped


def lookup(transformer, predictor: str) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    """Every registered schedule of this model and predictor, as ((T, steps), ...)."""
    _load_shipped()
    by_t = _REGISTRY.get(model_key(transformer), {}).get(predictor, {})
    return tuple((t, s) for t in sorted(by_t) for _, s in sorted(by_t[t].items()))


def checks(transformer, predictor: Optional[str] = None) -> Tuple[Tuple[int, int, float, float, str], ...]:
    """The held-out checks of this model's calibrations for ``predictor`` (None: every predictor),
    as ((T, passes, calibrated dB, spaced rule dB, predictor), ...): those of the schedules in use
    and of those that lost."""
    _load_shipped()
    by_pred = _CHECKS.get(model_key(transformer), {})
    return tuple((t, p, c, s, pred) for pred in sorted(by_pred) if predictor in (None, pred)
                 for t in sorted(by_pred[pred]) for p, (c, s) in sorted(by_pred[pred][t].items()))  # fmt: skip


def resolve(config, transformer):
    """What runs of ``config`` on this model (a ``tcpade.policy.plan.Resolved``; ``config`` itself is
    not changed): a budget that may use them gets the model's calibrated schedules for the config's
    predictor, or with ``calibrated_predictor`` those of every predictor the model is calibrated
    for, one per (T, passes) with its own predictor (``best_schedules``); otherwise none."""
    from .plan import Resolved

    if not config.wants_calibrated:
        return Resolved(config)
    if config.calibrated_predictor:  # (every predictor's checks: the summary names those that lost)
        return Resolved(config, calibrated=best_schedules(transformer), checks=checks(transformer))
    predictor = source = config.predictor
    found = lookup(transformer, predictor)
    if not found and predictor in L.CHOOSERS:  # "auto": the schedules of the variant it runs
        source = L.kernel_variant(predictor)
        found = lookup(transformer, source)
    # (the config's predictor runs them: "auto" on its variant's schedules)
    cal_checks = tuple((t, p, c, s, predictor) for t, p, c, s, _ in checks(transformer, source))
    return Resolved(config, calibrated=tuple((t, steps, predictor) for t, steps in found), checks=cal_checks)
