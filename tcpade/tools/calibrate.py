"""Calibrated schedules: search once, per model, which steps to compute.

    import tcpade
    from tcpade import zoo

    m = zoo.load("flux-digits")
    cal = tcpade.calibrate(m, [(0, 3), (1, 7)], passes=[8, 7], steps=20)   # (seed, label) inputs
    print(cal.curve())                  # calibration PSNR per pass count
    cfg = cal.config(8)                 # TCPadeConfig(schedule=..., schedule_steps=20)
    cal.save("schedules.json")          # keyed by model class + config hash, predictor and T
    tcpade.calibrate.load("schedules.json")   # registers them: budget presets now use them
    tcpade.apply(pipe, tcpade.TCPadeConfig.budget(passes=8))

The search runs the calibration inputs with full computation once, then scores candidate
schedules by their mean PSNR against it (one sampling run of every input per candidate).
Four searches:

* ``method="refine"`` (the default): for each requested pass count K, the best of the evenly
  spaced schedules with K passes (``tcpade.policy.schedules.even_family``, the spaced rule among them),
  then hill climbing: move one computed step a step earlier or later, keep the move when the
  PSNR rises, until a sweep over every step changes nothing (``sweeps``, default 2). It can only
  improve on the spaced rule on the calibration inputs, and costs about 2K runs per sweep.
* ``method="greedy"``: greedy removal. From every step computed (or ``start``), repeatedly drop
  the step whose removal costs the least PSNR, down to the smallest K; every count on the way
  is kept (nested schedules, the whole curve), O(T^2) runs.
* ``method="lazy"``: the same removal evaluated lazily: a removal's PSNR measured in an earlier
  round stands in for it until it tops the list, then it is re-measured; the first candidate
  that stays on top when fresh is dropped. About half the runs of exact greedy at 20 steps.
* ``method="trace"``: a fixed budget of runs (``runs``, default 20 up to 20 steps, 40 above,
  the full computation included), for models where a run is expensive. The full run also
  records every call's residual (a subset of token rows); every "predict step j from the
  computed steps before it" is scored offline with the predictor's own coefficients; dynamic
  programming gives the schedules of each pass count with the lowest offline error; the real
  runs verify the spaced rule, the best few of them and single-step moves around the best
  (``tcpade.tools.trace_search``). The offline error misses how errors compound, so the real
  runs decide.

bench/results/calibration.md and calibration_trace.md compare them (quality on other inputs,
and cost).

What can be calibrated:

* a zoo model (``tcpade.zoo.ZooModel``): inputs are (seed, label) pairs or seeds;
* a diffusers pipeline: inputs are its call kwargs (one dict per input; a ``"seed"`` key
  becomes ``generator=torch.Generator().manual_seed(seed)``); outputs are compared as
  ``output_type="pt"`` unless the kwargs say otherwise (``output_type="latent"``: the
  latents, in whatever layout the pipeline returns them, e.g. FLUX's packed ``(N, tokens, C)``);
* a bare transformer (FLUX, Wan, DiT, SD3, ...): pass ``noise_scheduler=`` and inputs as
  ``tcpade.sample`` kwargs (``latents`` in the transformer's layout, ``cond``, ``uncond``,
  ``guidance_scale``, ``timestep_scale``, ...).

Candidates are scored by PSNR (``tcpade.tools.metrics.psnr``), which takes any layout: images,
clips, packed or video latents. The data range is 2 for the zoo (images in [-1, 1]), 1 for
decoded pipeline outputs (``output_type`` "pt", "np" or "pil": in [0, 1]), and the full
computation's value range (max - min) for latents and bare transformers. SSIM is not used.

Held-out validation (``holdout=``, on by default): a search fits its few inputs, and on other
inputs a searched schedule can lose to the spaced rule it started from. So part of the inputs
(``holdout=0.5``: the last half; or ``holdout=[...]``: validation inputs of their own) is kept
out of the search, and after it every pass count's schedule (with the calibration's predictor)
and the spaced rule's (``TCPadeConfig.budget(passes=K, use_calibrated=False).plan(T, times)``, on
the run's times as the runtime places it, with
``tcpade.policy.schedules.SPACED_PREDICTOR``, "linear": what ``slow()`` / ``fast()`` run where no
calibrated schedule is used) run on them against their full computation. A schedule is used (``schedule(K)``, ``config(K)``, the registry, the budget
presets) only where its held-out PSNR is strictly higher than the spaced rule's; elsewhere the
spaced rule stands, and ``Calibration.validation`` / ``verdict(K)`` / the saved JSON say so.
One input leaves nothing to hold out: a ValueError, unless ``holdout=False`` (no validation:
every schedule is used, marked unvalidated). ``validate(target, cal, inputs)`` checks an
existing calibration on other inputs.

The cost is counted in runs (sampling runs of all inputs) and calls (transformer calls that
computed the block stack, every branch and input batch; the skipped calls cost one memory
pass each and are not counted); ``Calibration.runs`` / ``.calls`` / ``.seconds``, the
validation's runs included (and apart: ``validation_runs`` / ``_calls`` / ``_seconds``).

This module is callable: ``tcpade.calibrate(...)`` is ``tcpade.calibrate.calibrate(...)``.
Command line: ``tcpade calibrate MODEL --steps 20 --passes 7 --seeds 0,1,2,3 --out schedules.json`` (or
``python -m tcpade calibrate ...``). Importing it imports no torch (the search imports it
when it runs), so ``tcpade calibrate --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # imported where used: ``tcpade calibrate --help`` must not import torch
    import torch

    from ..policy.config import TCPadeConfig

__all__ = ["Calibration", "add_cli", "calibrate", "load", "main", "run_cli", "save", "shipped", "validate"]

METHODS = ("refine", "lazy", "greedy", "trace")


# ------------------------------------------------------------------------------------ targets
def _as_tensor(out) -> "torch.Tensor":
    """A pipeline's output (tensor, array, PIL images, or a list of those per video) as a float tensor."""
    import numpy as np
    import torch

    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out).float()
    if isinstance(out, (list, tuple)) and out:
        if all(isinstance(o, (list, tuple, np.ndarray, torch.Tensor)) for o in out):  # per video: its frames
            return torch.stack([_as_tensor(o) for o in out])
        if all(hasattr(o, "size") and hasattr(o, "mode") for o in out):  # PIL images
            return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0) for im in out])
    raise TypeError(f"tcpade.calibrate: cannot compare pipeline outputs of type {type(out).__name__}")


def _runner(target, inputs, steps, noise_scheduler):
    """The runner (``tcpade.tools.runner``) of ``target`` on the calibration inputs, and the PSNR's
    data range (None: the full computation's value range)."""
    import torch

    from .runner import PipelineRunner, TransformerRunner, ZooRunner

    if not inputs:
        raise ValueError("tcpade.calibrate needs at least one calibration input")
    if hasattr(target, "spec") and hasattr(target, "sample") and hasattr(target, "transformer"):
        pairs = [(int(x), 0) if not isinstance(x, (tuple, list)) else (int(x[0]), int(x[1])) for x in inputs]
        return ZooRunner(target, [p[0] for p in pairs], [p[1] for p in pairs], steps), 2.0  # images in [-1, 1]
    if isinstance(target, torch.nn.Module):
        if noise_scheduler is None:
            raise TypeError("tcpade.calibrate on a bare transformer needs noise_scheduler= (and tcpade.sample inputs)")
        return TransformerRunner(target, noise_scheduler, inputs, steps), None
    if isinstance(getattr(target, "transformer", None), torch.nn.Module):
        inputs = [{"output_type": "pt", **kw} for kw in inputs]
        # decoded outputs are in [0, 1]; latents are compared over their own range
        decoded = {kw["output_type"] for kw in inputs} <= {"pt", "np", "pil"}
        return PipelineRunner(target, inputs, steps, _as_tensor), 1.0 if decoded else None
    raise TypeError(
        f"tcpade.calibrate expects a zoo model, a diffusers pipeline or a transformer, got {type(target).__name__}"
    )


# ------------------------------------------------------------------------------------- result
@dataclass
class Calibration:
    """The result of a search: nested schedules per pass count and their calibration PSNR."""

    model: str  # tcpade.policy.schedules.model_key of the transformer
    predictor: str
    steps: int
    schedules: Dict[int, Tuple[int, ...]]  # passes -> computed steps
    psnr: Dict[int, float]  # passes -> mean PSNR against full computation on the calibration inputs
    passes: int  # the requested pass count
    inputs: int = 0
    method: str = "lazy"
    runs: int = 0
    calls: int = 0
    seconds: float = 0.0
    name: str = ""  # e.g. the zoo model's name (informational)
    extra: dict = field(default_factory=dict)
    # Held-out validation: passes -> (calibrated schedule, spaced rule) mean PSNR on the held-out
    # inputs against their full computation; ``holdout``: how many (0: not validated).
    validation: Dict[int, Tuple[float, float]] = field(default_factory=dict)
    holdout: int = 0
    validation_runs: int = 0  # (also counted in runs / calls / seconds)
    validation_calls: int = 0
    validation_seconds: float = 0.0

    @property
    def validated(self) -> bool:
        """Whether the schedules were checked on held-out inputs (False: ``holdout=False``, or a
        file written before the checks existed)."""
        return self.holdout > 0

    def used(self, passes: int) -> bool:
        """Whether the searched schedule for ``passes`` is used (registered, ``schedule``): it beat
        the spaced rule on the held-out inputs, or the calibration is unvalidated."""
        from ..policy import schedules as S

        if passes not in self.schedules:
            return False
        return not self.validated or (passes in self.validation and S.wins(self.validation[passes]))

    def verdict(self, passes: int) -> str:
        """The verdict of the held-out check for ``passes``: "calibrated" (the searched schedule beat
        the spaced rule on the held-out inputs), "spaced rule" (it did not: the spaced rule
        stands) or "unvalidated"."""
        if passes not in self.schedules:
            raise ValueError(f"no calibrated schedule with {passes} passes; have {sorted(self.schedules)}")
        if not self.validated or passes not in self.validation:
            return "unvalidated"
        return "calibrated" if self.used(passes) else "spaced rule"

    def schedule(self, passes: Optional[int] = None) -> Tuple[int, ...]:
        """The schedule the budget presets run with ``passes`` (default: the requested count) once
        this calibration is registered: the searched one (``schedules[passes]``) where it is used,
        else the spaced rule's."""
        p = self.passes if passes is None else passes
        if p not in self.schedules:
            raise ValueError(f"no calibrated schedule with {p} passes; have {sorted(self.schedules)}")
        if self.used(p):
            return self.schedules[p]
        from ..policy import schedules as S

        return _spaced_plan(S.SPACED_PREDICTOR, p, self.steps, self.extra.get("config_overrides") or {},
                            self.extra.get("times"))

    def config(self, passes: Optional[int] = None, **overrides) -> "TCPadeConfig":
        """A fixed-schedule config with ``schedule(passes)`` (default: the requested count) and its
        predictor: the calibration's with its schedule, the spaced rule's (``SPACED_PREDICTOR``)
        where the spaced rule stands."""
        from ..policy import schedules as S
        from ..policy.config import TCPadeConfig

        p = self.passes if passes is None else passes
        predictor = self.predictor if p not in self.schedules or self.used(p) else S.SPACED_PREDICTOR
        base = dict(predictor=predictor, schedule=self.schedule(passes), schedule_steps=self.steps)
        base.update(overrides)
        return TCPadeConfig(**base)

    def curve(self) -> List[Tuple[int, float]]:
        """(passes, calibration PSNR), most passes first."""
        return sorted(self.psnr.items(), reverse=True)

    def register(self) -> None:
        """Make the budget presets use these schedules on this model (tcpade.policy.schedules
        registry): those that are ``used``; the held-out checks go with them (``tcpade.summary``
        shows them), and a pass count whose schedule lost keeps the spaced rule."""
        from ..policy import schedules as S

        checks = dict(self.validation) if self.validated else None
        S.register(self.model, self.predictor, self.steps, self.schedules, self.psnr, checks)

    def to_json(self) -> dict:
        e = dict(model=self.model, name=self.name, predictor=self.predictor, steps=self.steps,
                 passes=self.passes, schedules={str(p): list(s) for p, s in sorted(self.schedules.items())},
                 psnr={str(p): round(v, 3) for p, v in sorted(self.psnr.items())}, inputs=self.inputs,
                 method=self.method, runs=self.runs, calls=self.calls, seconds=round(self.seconds, 1),
                 validated=self.validated)  # fmt: skip
        if self.validated:
            e["validation"] = dict(inputs=self.holdout, runs=self.validation_runs, calls=self.validation_calls,
                                   seconds=round(self.validation_seconds, 1),
                                   passes={str(p): dict(calibrated=round(c, 3), spaced=round(sp, 3),
                                                        used=self.used(p))
                                           for p, (c, sp) in sorted(self.validation.items())})  # fmt: skip
        e["extra"] = self.extra
        return e

    @classmethod
    def from_json(cls, e: dict) -> "Calibration":
        """An entry of a schedules file (an entry without held-out checks loads unvalidated; a
        check's ``used`` flag is recomputed from its numbers)."""
        v = e.get("validation") if e.get("validated", False) else None
        checks = {int(p): (float(c["calibrated"]), float(c["spaced"])) for p, c in (v or {}).get("passes", {}).items()}
        return cls(model=e["model"], name=e.get("name", ""), predictor=e["predictor"], steps=int(e["steps"]),
                   passes=int(e.get("passes", min(int(p) for p in e["schedules"]))),
                   schedules={int(p): tuple(s) for p, s in e["schedules"].items()},
                   psnr={int(p): float(v) for p, v in e.get("psnr", {}).items()}, inputs=int(e.get("inputs", 0)),
                   method=e.get("method", ""), runs=int(e.get("runs", 0)), calls=int(e.get("calls", 0)),
                   seconds=float(e.get("seconds", 0.0)), extra=e.get("extra", {}), validation=checks,
                   holdout=int(v.get("inputs") or 1) if v else 0, validation_runs=int(v.get("runs", 0)) if v else 0,
                   validation_calls=int(v.get("calls", 0)) if v else 0,
                   validation_seconds=float(v.get("seconds", 0.0)) if v else 0.0)  # fmt: skip

    def save(self, path: str) -> None:
        save(path, self)


def save(path: str, *results: Calibration) -> None:
    """Write calibrations to a JSON file, merged with the file's entries (same model, predictor and
    T replaced)."""
    from ..policy import schedules as S

    entries = []
    if os.path.exists(path):
        with open(path) as f:
            entries = S.entries_from_json(json.load(f))
    keys = {(r.model, r.predictor, r.steps) for r in results}
    entries = [e for e in entries if (e["model"], e["predictor"], int(e["steps"])) not in keys]
    entries += [r.to_json() for r in results]
    entries.sort(key=lambda e: (e.get("name", ""), e["model"], e["predictor"], int(e["steps"])))
    doc = dict(format="tcpade-schedules", version=S.FORMAT_VERSION, entries=entries)
    text = json.dumps(doc, indent=1)
    # one line per schedule
    text = re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def load(path: str, register: bool = True) -> List[Calibration]:
    """The calibrations of a JSON file (``register``: the budget presets use them from now on)."""
    from ..policy import schedules as S

    with open(path) as f:
        out = [Calibration.from_json(e) for e in S.entries_from_json(json.load(f))]
    if register:
        for r in out:
            r.register()
    return out


def shipped(name: str, steps: int, predictor: str = "rational") -> Optional[Calibration]:
    """The zoo's shipped calibration of model ``name`` at ``steps`` steps (not registered), or None."""
    from ..policy import schedules as S

    return next((c for c in load(S.SHIPPED, register=False)
                 if c.name == name and c.steps == steps and c.predictor == predictor), None)  # fmt: skip


# ------------------------------------------------------------------------------------- search
def _bar(total: int, progress, steps: int):
    """The search's progress bar (``tcpade.integrations.progress.Progress``): a step per pass count found;
    ``progress`` True: when stdout is a terminal, False: none."""
    from ..integrations.progress import Progress

    return Progress(total, f"tcpade.calibrate T={steps}", enabled=None if progress else False)


def calibrate(
    target,
    inputs: Sequence,
    *,
    passes=None,
    speedup: Optional[float] = None,
    steps: int = 20,
    predictor: str = "rational",
    method: str = "refine",
    noise_scheduler=None,
    progress: bool = True,
    config_overrides: Optional[dict] = None,
    start: Optional[Sequence[int]] = None,
    sweeps: int = 2,
    holdout=0.5,
    runs: Optional[int] = None,
) -> Calibration:
    """Search the schedule of ``passes`` computed steps of ``steps`` (or round(steps / speedup))
    that keeps the calibration inputs closest to full computation, and check it against the
    spaced rule on held-out inputs (see the module docstring).

    target: a zoo model, a diffusers pipeline or a transformer (then ``noise_scheduler=``).
    inputs: (seed, label) pairs / seeds (zoo), call kwargs (pipeline), ``tcpade.sample`` kwargs
    (transformer). predictor and ``config_overrides``: the TCPadeConfig the schedules run with.
    holdout: a share in (0, 1): the last round(share * n) inputs (at least 1, and at least 1 left
    for the search) are held out of the search and validate it; a non-empty list: validation
    inputs of their own (the search uses every input); False: no validation (every schedule is
    used, the result marked unvalidated). A schedule is used only where it beats the spaced rule
    on the held-out inputs (``Calibration.used``).
    start: the schedule the removal starts from (default: every step). A coarser start (e.g.
    ``tcpade.policy.schedules.spaced(50, 30)``) makes a long run's search several times cheaper; the
    curve then begins at its pass count.
    passes: one pass count or several (refine searches each; greedy / lazy go down to the
    smallest and keep every count on the way), each in [lead, steps], lead being the steps
    every schedule computes first (``tcpade.core.layout.MIN_HISTORY[predictor]``: 1; paper 2).
    sweeps: refine's hill-climbing sweeps per count.
    runs: trace's budget of sampling runs of the search inputs, the full computation included
    (default ``tcpade.tools.trace_search.default_runs(steps)``: 20 up to 20 steps, 40 above; the
    held-out check's runs come on top).
    Returns a :class:`Calibration` (``passes``: the smallest requested count).
    """
    from ..core.layout import MIN_HISTORY
    from ..policy import schedules as S
    from ..policy.config import TCPadeConfig
    from . import metrics

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"tcpade.calibrate: steps must be an int >= 1, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"tcpade.calibrate: method must be one of {METHODS}, got {method!r}")
    if runs is not None and method != "trace":
        raise ValueError(f"tcpade.calibrate: runs is the trace search's budget; it needs method='trace', "
                         f"got {method!r}")
    if (passes is None) == (speedup is None):
        raise ValueError("tcpade.calibrate takes exactly one of passes=K or speedup=S")
    overrides = dict(config_overrides or {})
    many = list(passes) if isinstance(passes, (list, tuple, range)) else []
    if many and not all(isinstance(p, int) and not isinstance(p, bool) for p in many):
        raise ValueError(f"tcpade.calibrate: passes must be an int or a sequence of ints, got {passes!r}")
    # The budget's validation and rounding, one place.
    budget = TCPadeConfig(predictor=predictor, passes=min(many) if many else passes, speedup=speedup, **overrides)
    lead = MIN_HISTORY[predictor]
    if steps < lead:
        raise ValueError(f"tcpade.calibrate: steps must be >= {lead} (the {predictor!r} predictor computes the first "
                         f"{lead} step(s)), got {steps}")  # fmt: skip
    outside = [p for p in (many or ([passes] if passes is not None else [])) if not lead <= p <= steps]
    if outside:
        raise ValueError(f"tcpade.calibrate: passes must be in [{lead}, {steps}] (the {predictor!r} predictor computes "
                         f"the first {lead} step(s); steps={steps}), got {outside}")  # fmt: skip
    targets = sorted({budget.budget_passes(steps)} | {TCPadeConfig(predictor=predictor, passes=p).budget_passes(steps)
                                                       for p in many})  # fmt: skip
    inputs, held = _split(inputs, holdout)
    runner, data_range = _runner(target, inputs, steps, noise_scheduler)

    counters = dict(runs=0, calls=0)
    execute = _executor(runner, predictor, steps, overrides, counters)

    t0 = time.perf_counter()
    # Full computation through the same path (a schedule of every step: the model's own outputs).
    recorder = None
    if method == "trace":  # the full run also records the residuals the offline scores read
        from .trace_search import Recorder

        recorder = Recorder()
    with recorder if recorder is not None else contextlib.nullcontext():
        full = execute(range(steps))
    ref, branches, times = full.outputs, full.branches, full.times  # (times: the spaced rule's axis)
    data_range = data_range or float(ref.max() - ref.min()) or 1.0

    def score(sched) -> float:
        out = execute(sched).outputs
        return float(metrics.psnr(out, ref, data_range=data_range).mean())

    if method == "refine":
        path, curve = _refine(score, steps, targets, lead, sweeps, progress)
    elif method == "trace":
        from .trace_search import default_runs, search_runner

        run_budget = default_runs(steps) if runs is None else runs
        path, curve = search_runner(runner, score, steps, targets, lead, predictor, recorder.trace(steps), run_budget,
                                    counters["runs"], config_overrides=overrides, progress=progress,
                                    spaced_rule=lambda k: _spaced_plan(predictor, k, steps, overrides, times))  # fmt: skip
    else:
        path, curve = _remove(score, steps, min(targets), lead, method, start, predictor, progress, counters)
    seconds = time.perf_counter() - t0
    name = getattr(getattr(target, "spec", None), "name", "")
    cal = Calibration(model=S.model_key(runner.transformer), name=name, predictor=predictor, steps=steps,
                      schedules=path, psnr=curve, passes=min(targets), inputs=len(inputs), method=method,
                      runs=counters["runs"], calls=counters["calls"], seconds=seconds,
                      extra=dict(branches=branches, start=max(path),
                                 **({"config_overrides": overrides} if overrides else {}),
                                 **({"times": list(times)} if times is not None else {})))  # fmt: skip
    if held:  # the held-out check of every pass count found
        cal = validate(target, cal, held, noise_scheduler=noise_scheduler, progress=progress)
    return cal


def _executor(runner, predictor: str, steps: int, overrides: dict, counters: dict):
    """``execute(sched)``: one sampling run of the runner's inputs with that fixed schedule (the
    runner's result: outputs, branches, calls), counted in ``counters`` (runs, calls)."""
    from ..policy.config import TCPadeConfig

    def execute(sched):
        run = runner.run(TCPadeConfig(predictor=predictor, schedule=tuple(sched), schedule_steps=steps, **overrides))
        counters["runs"] += 1
        counters["calls"] += run.calls
        return run

    return execute


def _split(inputs, holdout) -> Tuple[list, list]:
    """(search inputs, held-out inputs) of ``calibrate``'s ``holdout`` (its docstring), or ValueError."""
    inputs = list(inputs)
    if not inputs:
        raise ValueError("tcpade.calibrate needs at least one calibration input")
    if holdout is False:
        return inputs, []
    what = ("holdout must be a share of the inputs in (0, 1), a non-empty list of validation inputs, or False "
            "(no validation)")  # fmt: skip
    if isinstance(holdout, (list, tuple)):
        if not holdout:
            raise ValueError(f"tcpade.calibrate: {what}; got an empty list")
        return inputs, list(holdout)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        raise ValueError(f"tcpade.calibrate: {what}; got {holdout!r}")
    if not 0 < holdout < 1:  # (NaN too)
        raise ValueError(f"tcpade.calibrate: {what}; got {holdout!r}")
    n = len(inputs)
    if n < 2:
        raise ValueError("tcpade.calibrate: one calibration input leaves none to hold out for validation: give more "
                         "inputs, validation inputs of their own (holdout=[...]), or holdout=False to skip the check "
                         "(the result is then marked unvalidated)")  # fmt: skip
    m = min(n - 1, max(1, int(math.floor(holdout * n + 0.5))))
    return inputs[: n - m], inputs[n - m :]


def _spaced_plan(predictor: str, passes: int, steps: int, overrides: dict, times=None) -> Tuple[int, ...]:
    """The spaced rule's schedule of ``passes`` at ``steps``: what the budget computes without a
    calibrated schedule (``TCPadeConfig.budget(passes=K, use_calibrated=False).plan(T, times)``,
    ``times`` the run's, as the runtime saw them: the rule is placed on them, with no more than
    ``PRESET_MAX_RUN`` steps predicted in a row where ``passes`` can keep that, as
    ``slow()`` / ``fast()`` run it there)."""
    from ..policy import schedules as S
    from ..policy.config import TCPadeConfig

    # the presets' guard, as fast(passes=K) runs it: the placement on the times cut to at most
    # PRESET_MAX_RUN predicted steps in a row where K can keep that (the count stays K)
    fields = dict(passes=passes, use_calibrated=False, predictor=predictor, budget_max_run=S.PRESET_MAX_RUN)
    cfg = TCPadeConfig.budget(**{**fields, **overrides})
    return tuple(cfg.plan(steps, times))


def validate(target, calibration: Calibration, inputs: Sequence, *, noise_scheduler=None,
             progress: bool = True) -> Calibration:  # fmt: skip
    """``calibration`` checked on ``inputs`` (held out of its search; the same forms as
    ``calibrate``'s): one full run of them as the reference, then for every pass count its
    schedule and the spaced rule's (one run when they are the same schedule), mean PSNR each.
    Returns a copy with ``validation`` ({passes: (calibrated dB, spaced rule dB)}), ``holdout``
    and the runs counted (in ``runs`` / ``calls`` / ``seconds`` and in ``validation_*``; an
    earlier validation's are replaced)."""
    import dataclasses

    from ..policy import schedules as S
    from . import metrics

    inputs = list(inputs)
    if not inputs:
        raise ValueError("tcpade.calibrate.validate needs at least one held-out input")
    steps, predictor = calibration.steps, calibration.predictor
    overrides = dict(calibration.extra.get("config_overrides") or {})
    runner, data_range = _runner(target, inputs, steps, noise_scheduler)
    key = S.model_key(runner.transformer)
    if key != calibration.model:
        raise ValueError(f"tcpade.calibrate.validate: the calibration is of model {calibration.model}, "
                         f"the target is {key}")  # fmt: skip
    counters = dict(runs=0, calls=0)
    execute = _executor(runner, predictor, steps, overrides, counters)
    execute_spaced = _executor(runner, S.SPACED_PREDICTOR, steps, overrides, counters)

    t0 = time.perf_counter()
    full = execute(range(steps))
    ref, times = full.outputs, full.times
    data_range = data_range or float(ref.max() - ref.min()) or 1.0

    def score(sched, run=execute) -> float:
        return float(metrics.psnr(run(sched).outputs, ref, data_range=data_range).mean())

    checks = {}
    same = predictor == S.SPACED_PREDICTOR
    bar = _bar(len(calibration.schedules), progress, steps)
    try:
        for k, sched in sorted(calibration.schedules.items(), reverse=True):
            spaced = _spaced_plan(S.SPACED_PREDICTOR, k, steps, overrides, times)
            spaced_db = score(spaced, execute_spaced)
            cal_db = spaced_db if same and tuple(sched) == spaced else score(sched)
            checks[k] = (cal_db, spaced_db)
            bar.step(f"held-out {k} passes {cal_db:.2f} dB (spaced rule {spaced_db:.2f})")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    c = calibration
    extra = dict(c.extra, times=list(times)) if times is not None else c.extra  # the checks' spaced rule's axis
    return dataclasses.replace(c, validation=checks, holdout=len(inputs), extra=extra,
                               runs=c.runs - c.validation_runs + counters["runs"],
                               calls=c.calls - c.validation_calls + counters["calls"],
                               seconds=c.seconds - c.validation_seconds + seconds, validation_runs=counters["runs"],
                               validation_calls=counters["calls"], validation_seconds=seconds)  # fmt: skip


def _remove(score, steps, target_passes, lead, method, start, predictor, progress, counters):
    """Greedy removal (exact or lazy) from ``start`` (default every step) down to ``target_passes``."""
    from ..policy import schedules as S
    from . import metrics

    try:
        current = list(range(steps)) if start is None else list(S.check_schedule(start, steps, predictor, "start"))
    except ValueError as exc:
        raise ValueError(f"tcpade.calibrate: {str(exc).replace('TCPadeConfig.start', 'start')}") from None
    if len(current) < target_passes:
        raise ValueError(f"tcpade.calibrate: start has {len(current)} passes, fewer than the {target_passes} asked for")
    path = {len(current): tuple(current)}
    curve = {len(current): metrics.PSNR_CAP if start is None else score(current)}
    bar = _bar(len(current) - target_passes, progress, steps)
    bound: Dict[int, Tuple[float, int]] = {}  # step -> (PSNR without it, size of the schedule it was measured at)
    try:
        while len(current) > target_passes:
            cands = [j for j in current if j >= lead]
            if method == "greedy":
                scored = [(score([s for s in current if s != j]), j) for j in cands]
                best_psnr, best = max(scored)
            else:
                n = len(current)
                while True:
                    # the highest (possibly stale) score; unmeasured candidates first
                    j = max(cands, key=lambda c: (bound.get(c, (math.inf, 0))[0], c))
                    if j in bound and bound[j][1] == n:
                        best, best_psnr = j, bound[j][0]
                        break
                    bound[j] = (score([s for s in current if s != j]), n)
            current.remove(best)
            bound.pop(best, None)
            path[len(current)] = tuple(current)
            curve[len(current)] = best_psnr
            bar.step(f"{len(current)} passes {best_psnr:.2f} dB")
    finally:
        bar.close()
    return path, curve


def _refine(score, steps, targets, lead, sweeps, progress):
    """Per pass count: the best evenly spaced schedule on the calibration inputs, then hill
    climbing: move one computed step a step earlier or later, keep the move if the PSNR rises,
    until a sweep over every step changes nothing (or ``sweeps`` sweeps)."""
    from ..policy import schedules as S

    path, curve = {}, {}
    bar = _bar(len(targets), progress, steps)
    try:
        for k in sorted(targets, reverse=True):
            scored = [(score(c), c) for c in S.even_family(steps, k, lead)]
            best, cur = max(scored)
            cur = list(cur)
            for _ in range(sweeps):
                moved = False
                for i in range(lead, k):
                    lo = cur[i - 1] + 1
                    hi = cur[i + 1] - 1 if i + 1 < k else steps - 1
                    for new in (cur[i] - 1, cur[i] + 1):
                        if lo <= new <= hi:
                            cand = cur[:i] + [new] + cur[i + 1 :]
                            v = score(cand)
                            if v > best:
                                best, cur, moved = v, cand, True
                                break
                if not moved:
                    break
            path[k], curve[k] = tuple(cur), best
            bar.step(f"{k} passes {best:.2f} dB")
    finally:
        bar.close()
    return path, curve


# ---------------------------------------------------------------------------------------- CLI
_DESCRIPTION = """\
Search which steps to compute for a zoo model or a local diffusers pipeline folder, against
full computation on the calibration inputs (one per seed), and save the schedules as JSON
(tcpade.calibrate.load registers them: the budget presets then use them on that model).

searches (--method):
  refine  (default) for each pass count, the best evenly spaced schedule, then hill climbing:
          move one computed step a step earlier or later while the PSNR rises
  greedy  greedy removal: from every step computed, drop the step whose removal costs the
          least PSNR, down to the fewest passes asked for (every count on the way is kept)
  lazy    the same removal evaluated lazily (about half the runs of greedy)
  trace   one recorded full run scores every schedule offline (dynamic programming), then at
          most --runs sampling runs (default 20 up to 20 steps, 40 above; the full run
          included) verify the best candidates and single-step moves around the best

Pass counts must be in [lead, --steps]: a schedule always computes its first `lead` steps
(the residuals the predictor needs: 2; reuse: 1).

held-out validation: --holdout SHARE (default 0.5) keeps the last share of the seeds out of the
search; --holdout-seeds gives validation seeds of their own instead. Every pass count's
schedule and the spaced rule's run on them; a schedule is saved as usable only where it
beats the spaced rule there (elsewhere the budget presets keep the spaced rule). One seed
needs --holdout off (no validation: the schedules are saved unvalidated).
"""


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``calibrate`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("calibrate", help="search a calibrated schedule for a model and save it as JSON",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _arguments(p)
    p.set_defaults(func=run_cli)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..core import layout as L
    from .args import zoo_names

    p.add_argument("model", metavar="MODEL",
                   help=f"a zoo model ({', '.join(zoo_names())}) or a local diffusers pipeline folder")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="denoising steps T (default 20)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--passes", help="computed steps per branch: one count or a comma-separated list, each in "
                   "[lead, --steps] (lead 2; reuse 1)")  # fmt: skip
    g.add_argument("--speedup", type=float, help="... or the ratio T / passes (a number >= 1)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, one calibration input each (default 0,1)")
    h = p.add_mutually_exclusive_group()
    h.add_argument("--holdout", default="0.5", metavar="SHARE",
                   help="the share of the seeds (the last ones) held out of the search to validate it against the "
                   "spaced rule, in (0, 1), or 'off' (default 0.5)")  # fmt: skip
    h.add_argument("--holdout-seeds", default=None, metavar="SEEDS",
                   help="validation seeds of their own (comma-separated; the search uses every --seeds): zoo models "
                   "take labels 0, 1, .. in turn, pipelines the --prompt / --labels in turn")  # fmt: skip
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels: zoo models, one per seed (default 0, 1, ..); "
                   "class-conditional pipelines (DiT), paired with the seeds in turn (default 0)")  # fmt: skip
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt pipelines: a prompt (repeat for several; paired with the seeds in turn)")  # fmt: skip
    p.add_argument("--predictor", default="rational", choices=L.PREDICTORS,
                   help="the predictor the schedules run with (default rational)")  # fmt: skip
    p.add_argument("--method", default="refine", choices=METHODS, help="the search (default refine; see above)")
    p.add_argument("--runs", default=None, help="--method trace: its budget of sampling runs, the full run included "
                   "(default 20 up to 20 steps, 40 above)")  # fmt: skip
    p.add_argument("--out", default="schedules.json",
                   help="JSON file to write, or to merge into (default schedules.json)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _check_out(path: str) -> None:
    from .args import UsageError

    if os.path.isdir(path):
        raise UsageError(f"--out: {path!r} is a folder; give a JSON file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--out: folder {parent!r} does not exist")
    if os.path.exists(path):  # merged into at the end: refuse a file that is not ours now, not after the search
        from ..policy import schedules as S

        try:
            with open(path) as f:
                S.entries_from_json(json.load(f))
        except (OSError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"--out: cannot merge into {path!r}: {msg}") from None


def _holdout(text: str, seeds: list):
    """--holdout's share (a float in (0, 1)) or False ('off'), or UsageError."""
    from .args import UsageError

    if text.strip().lower() == "off":
        return False
    try:
        share = float(text)
    except ValueError:
        share = None
    if share is None or not 0 < share < 1:
        raise UsageError(f"--holdout must be a share in (0, 1) or 'off', got {text!r}")
    if len(seeds) < 2:
        raise UsageError("--holdout: one seed leaves none to hold out for validation: give more --seeds, "
                         "--holdout-seeds, or --holdout off (the schedules are then saved unvalidated)")  # fmt: skip
    return share


def _pipeline(path: str, prompts, labels, seeds):
    """The pipeline in folder ``path`` and its calibration inputs (one per seed), or UsageError."""
    from .args import UsageError
    from .runner import check_class_labels, conditioning, load_pipeline

    pipe = load_pipeline(path, "MODEL", what=" to calibrate")
    name = type(pipe).__name__
    kind = conditioning(pipe)
    if kind == "labels":
        if prompts:
            raise UsageError(f"--prompt: {name} takes class labels, not prompts: use --labels")
        labels = labels if labels is not None else [0]
        if len(labels) > len(seeds):
            raise UsageError(f"--labels: {len(labels)} labels for {len(seeds)} seeds (one calibration input per seed)")
        check_class_labels(pipe, labels)
        inputs = [dict(class_labels=[labels[i % len(labels)]], seed=s) for i, s in enumerate(seeds)]
    elif kind == "prompt":
        if labels is not None:
            raise UsageError(f"--labels: {name} takes prompts, not class labels: use --prompt")
        prompts = prompts or [""]
        if len(prompts) > len(seeds):
            raise UsageError(f"--prompt: {len(prompts)} prompts for {len(seeds)} seeds "
                             "(one calibration input per seed)")  # fmt: skip
        inputs = [dict(prompt=prompts[i % len(prompts)], seed=s) for i, s in enumerate(seeds)]
    else:
        raise UsageError(f"MODEL: {name}.__call__ takes neither prompt nor class_labels")
    return pipe, inputs


def run_cli(args) -> int:
    """Run the ``calibrate`` subcommand from parsed arguments; returns the exit status. A bad
    value raises ``tcpade.tools.args.UsageError`` (one line naming the flag) before any model loads."""
    from ..core.layout import MIN_HISTORY  # plain Python: the command line imports no torch here
    from .args import UsageError, at_least, int_list, zoo_names
    from .args import seeds as parse_seeds

    # every check that needs no model first (and no torch until the --out check)
    lead = MIN_HISTORY[args.predictor]
    if args.steps < lead:
        raise UsageError(f"--steps must be >= {lead} (the {args.predictor!r} predictor computes the first {lead} "
                         f"step(s)), got {args.steps}")  # fmt: skip
    passes = None
    if args.passes is not None:
        passes = int_list(args.passes, "--passes")
        outside = [k for k in passes if not lead <= k <= args.steps]
        if outside:
            raise UsageError(f"--passes must be in [{lead}, {args.steps}] (a schedule computes the first {lead} "
                             f"step(s), and at most --steps {args.steps}), "
                             f"got {', '.join(map(str, outside))}")  # fmt: skip
    at_least(args.speedup, 1.0, "--speedup")
    at_least(args.threads, 1, "--threads")
    runs = None
    if args.runs is not None:
        if args.method != "trace":
            raise UsageError(f"--runs is the trace search's budget: it needs --method trace (got --method "
                             f"{args.method})")
        try:
            runs = int(args.runs)
        except ValueError:
            raise UsageError(f"--runs must be an int, got {args.runs!r}") from None
        at_least(runs, 2, "--runs")
    seeds = parse_seeds(args.seeds)
    held_seeds = parse_seeds(args.holdout_seeds, "--holdout-seeds") if args.holdout_seeds is not None else None
    holdout = _holdout(args.holdout, seeds) if held_seeds is None else None
    labels = int_list(args.labels, "--labels") if args.labels is not None else None
    folder = os.path.isdir(args.model)
    if not folder:
        if args.model not in zoo_names():
            raise UsageError(f"MODEL {args.model!r} is neither a zoo model ({', '.join(zoo_names())}) "
                             "nor a pipeline folder")  # fmt: skip
        if args.prompt:
            raise UsageError(f"--prompt: zoo model {args.model} takes class labels, not prompts: use --labels")
        if labels is not None and len(labels) != len(seeds):
            raise UsageError(f"--labels needs one label per seed: {len(labels)} label(s) for {len(seeds)} seed(s)")
    _check_out(args.out)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if folder:
        target, inputs = _pipeline(args.model, args.prompt, labels, seeds)
        if held_seeds is not None:
            holdout = _pipeline(args.model, args.prompt, labels, held_seeds)[1]
    else:
        from .. import zoo

        n = zoo.SPECS[args.model].num_classes
        labels = labels if labels is not None else [i % n for i in range(len(seeds))]
        bad = [x for x in labels if not 0 <= x < n]
        if bad:
            raise UsageError(f"--labels: {args.model} has classes 0..{n - 1}, got {bad}")
        target = zoo.load(args.model)
        inputs = list(zip(seeds, labels))
        if held_seeds is not None:
            holdout = [(s, i % n) for i, s in enumerate(held_seeds)]
    cal = calibrate(target, inputs, passes=passes, speedup=args.speedup, steps=args.steps,
                    predictor=args.predictor, method=args.method, holdout=holdout, runs=runs)  # fmt: skip
    cal.save(args.out)
    print(report(cal))
    print(f"wrote {args.out}")
    return 0


def report(cal: Calibration) -> str:
    """The command line's summary of a calibration: its cost, and per pass count the calibration
    PSNR, the schedule, and the held-out check with its verdict."""
    lines = [f"{cal.name or cal.model}: T={cal.steps}, {cal.inputs} search input(s), {cal.runs} runs, "
             f"{cal.calls} block-stack calls, {cal.seconds:.1f} s"]  # fmt: skip
    if cal.validated:
        lines.append(f"  validation on {cal.holdout} held-out input(s): {cal.validation_runs} runs, "
                     f"{cal.validation_calls} block-stack calls, {cal.validation_seconds:.1f} s "
                     "(in the totals)")  # fmt: skip
    else:
        lines.append("  unvalidated (no held-out inputs): every schedule is used")
    for p, v in cal.curve():
        line = f"  {p:3d} passes  {v:6.2f} dB  {' '.join(map(str, cal.schedules[p]))}"
        if p in cal.validation:
            c, sp = cal.validation[p]
            used = "calibrated schedule used" if cal.used(p) else "spaced rule kept"
            line += f"  | held-out {c:.2f} dB, spaced rule {sp:.2f} dB: {used}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m tcpade.tools.calibrate ARGS``: the ``tcpade calibrate`` command line."""
    from .args import ArgumentParser, UsageError

    p = ArgumentParser(prog="tcpade calibrate", description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _arguments(p)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except UsageError as exc:
        print(f"{p.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


class _CallableModule(types.ModuleType):
    """``tcpade.calibrate`` is both this module (save, load, Calibration, the CLI) and the search."""

    def __call__(self, *args, **kwargs) -> Calibration:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
