"""The user-facing calls: apply, remove, summary.

    import tcpade
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    image = pipe(prompt, num_inference_steps=20).images[0]
    print(tcpade.summary(pipe))
    tcpade.remove(pipe)

``apply`` takes a diffusers pipeline (its ``transformer`` is hooked, and the number of
steps of each run is read from the noise scheduler of the pipeline that is calling: this
one, or one derived from it with ``from_pipe``, also from several threads at once; see
docs/runtime.md, "Serving") or a supported
transformer (then pass ``num_steps``, the length of its runs; a run of another length
is warned about once, and a longer one is computed in full from step ``num_steps`` on).
Integration goes through diffusers' hook registry only; ``remove`` takes every hook off
again, after which the model computes exactly what it did before.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..policy import schedules
from ..policy.config import TCPadeConfig
from ..policy.plan import Resolved
from ..policy.runtime import RUNTIME_ATTR, Runtime, StepRecord, attached_runtime
from . import distributed


def _adapters():
    """The diffusers integration, imported on first use: the kernels, ops and Runtime work
    without diffusers installed."""
    try:
        from . import adapters
    except ImportError as exc:
        raise ImportError(
            f"tcpade.apply/remove need diffusers >= 0.42 (pip install 'tcpade[diffusers]'): {exc}"
        ) from exc
    return adapters


def _split(target):
    """(pipeline or None, transformer) for a pipeline or a transformer."""
    if isinstance(target, torch.nn.Module):
        return None, target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return target, transformer
    raise TypeError(
        f"tcpade.apply expects a diffusers pipeline with a .transformer, or a transformer module; "
        f"got {type(target).__name__}"
    )


class PipelineBusyError(RuntimeError):
    """One pipeline object called from two threads at once (diffusers pipelines keep the run's
    state on the pipeline and its scheduler): make one pipeline per thread with
    ``Pipeline.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))``."""


_BUSY = ("diffusers pipelines are not thread-safe (the run's state lives on the pipeline and its scheduler): "
         "make one pipeline per thread, sharing the models, with "
         "type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))")  # fmt: skip


class _Owner:
    """The thread running a pipeline's call, and that call's frame, by id (holding the frame would
    keep the call's locals alive: latents, embeddings)."""

    __slots__ = ("thread", "frame", "pipe", "collided")

    def __init__(self, thread: int, frame, pipe):
        self.thread, self.frame, self.pipe, self.collided = thread, id(frame), weakref.ref(pipe), False


def _running(owner: _Owner, pipe) -> bool:
    """Is the owner's thread still inside that call of ``pipe``? (A frame at the same address that
    is a ``__call__`` of the same pipeline is a call of it either way.)"""
    f = sys._current_frames().get(owner.thread)
    while f is not None:
        if id(f) == owner.frame and f.f_code.co_name == "__call__" and f.f_locals.get("self") is pipe:
            return True
        f = f.f_back
    return False


class _Caller:
    """The pipeline whose call is running the current transformer call: the nearest caller frame
    of a ``__call__`` whose ``self`` has this transformer as its ``transformer`` and a scheduler
    (the pipeline ``apply`` was given, or one derived from it with ``from_pipe``, which has its own
    scheduler); the pipeline ``apply`` was given when there is none (the transformer called on
    its own, or from a function other than a pipeline's ``__call__``).

    It also refuses one pipeline object run by two threads at once: the second thread's
    transformer call raises ``PipelineBusyError``, and so does the first thread's next one (the
    second call has already reset the pipeline's scheduler by then, so neither result would be
    valid)."""

    _DEPTH = 64  # frames searched (a pipeline's __call__ is about 10 frames above the root hook)

    def __init__(self, pipe, transformer):
        self.pipe, self.transformer = pipe, transformer
        self._owners: Dict[int, _Owner] = {}
        self._lock = threading.Lock()

    def __call__(self):
        frame, depth, transformer = sys._getframe(1), 0, self.transformer
        while frame is not None and depth < self._DEPTH:
            if frame.f_code.co_name == "__call__":
                obj = frame.f_locals.get("self")
                model = getattr(obj, "transformer", None)
                if (model is not None and getattr(model, "_orig_mod", model) is transformer
                        and hasattr(obj, "scheduler")):  # fmt: skip
                    self._claim(obj, frame)
                    return obj
            frame, depth = frame.f_back, depth + 1
        return self.pipe

    def _claim(self, pipe, frame) -> None:
        me = threading.get_ident()
        with self._lock:
            owner = self._owners.get(id(pipe))
            if owner is not None and owner.pipe() is pipe:
                if owner.thread == me and owner.frame == id(frame):
                    if owner.collided:
                        del self._owners[id(pipe)]
                        raise PipelineBusyError(
                            f"tcpade: another thread called this {type(pipe).__name__} while this call was running "
                            f"(it reset the pipeline's scheduler, so this call's result would be wrong); {_BUSY}")
                    return
                if owner.thread != me and not owner.collided and _running(owner, pipe):
                    owner.collided = True
                    raise PipelineBusyError(
                        f"tcpade: this {type(pipe).__name__} is already running in another thread "
                        f"(thread id {owner.thread}); {_BUSY}")
            self._owners[id(pipe)] = _Owner(me, frame, pipe)
            if len(self._owners) > 64:  # pipelines gone or long finished
                for key in [k for k, o in self._owners.items() if o.pipe() is None]:
                    del self._owners[key]


def _scheduler_steps(pipe):
    """T of the pipeline's current run: the scheduler's timesteps from its begin index on.

    img2img and inpainting pipelines set all timesteps and start the loop part-way
    (``scheduler.set_begin_index(t_start)``, strength 0.6 of 20 steps: 12 run); a
    text-to-image run leaves the begin index at None or 0. ``pipe`` is a pipeline, or a
    callable returning the pipeline whose call is running (``_Caller``)."""
    find = pipe if isinstance(pipe, _Caller) else (lambda: pipe)

    def steps() -> Optional[int]:
        scheduler = getattr(find(), "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        n = len(timesteps) - int(begin)
        return n if n > 0 else None

    return steps


class _SchedulerClock:
    """The time of the pipeline's current step, from a host copy of its scheduler's timesteps.

    A pipeline passes the transformer a device tensor built from ``scheduler.timesteps[i]``;
    reading that tensor would cost a host wait per transformer call. Instead the clock copies
    ``scheduler.timesteps`` to the host once per sampling run (``set_timesteps`` makes a new
    tensor each run: one read, counted in ``reads``) and indexes it with the scheduler's
    ``step_index`` (a Python int; before the run's first ``scheduler.step`` it is None and the
    run starts at the ``begin_index``, set by img2img pipelines, or 0). The time is the
    scheduler's (FLUX's transformer gets it divided by 1000): the runtime uses only time
    differences and ratios, which an affine map leaves as they are.

    None, and the runtime reads the call's timestep instead, where that is unknown: a
    scheduler without ``step_index`` (DDIM), or a pipeline that keeps ``_current_timestep``
    and is not inside its denoising loop (the transformer called on its own)."""

    def __init__(self, pipe):
        self.pipe = pipe  # a pipeline, or a _Caller that finds the calling one
        self.reads = 0
        self._local = threading.local()  # the host copy: per thread, each runs its own pipeline

    def __call__(self) -> Optional[float]:
        pipe = self.pipe() if isinstance(self.pipe, _Caller) else self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or not hasattr(scheduler, "step_index"):
            return None
        if hasattr(pipe, "_current_timestep") and pipe._current_timestep is None:
            return None
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        local = self._local
        if timesteps is not getattr(local, "source", None):
            local.host = [float(t) for t in timesteps.reshape(-1).tolist()]
            local.source = timesteps
            self.reads += 1
        host = local.host
        return host[index] if 0 <= index < len(host) else None

    def run_times(self, total: int):
        """The times of the run's ``total`` steps from the host copy the calls made (the spaced
        rule's axis; no read of its own), or None before one was made."""
        pipe = self.pipe() if isinstance(self.pipe, _Caller) else self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        host = getattr(self._local, "host", None)
        if host is None or getattr(scheduler, "timesteps", None) is not getattr(self._local, "source", None):
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return host[begin : begin + total] if len(host) - begin == total else None


# The second transformer of a two-expert pipeline (Wan2.2: ``transformer`` denoises the
# high-noise steps, ``transformer_2`` the rest).
_EXPERTS = ("transformer_2",)


def _experts(pipe) -> List[torch.nn.Module]:
    if pipe is None:
        return []
    return [m for m in (getattr(pipe, n, None) for n in _EXPERTS) if isinstance(m, torch.nn.Module)]


class _Expert:
    """The controller of a pipeline's second expert: the pipeline's Runtime, with the expert's own
    histories (the step index, T and the stages run over the whole sampling run)."""

    def __init__(self, runtime: Runtime, name: str):
        self.runtime, self.name = runtime, name

    def decide(self, branch, timestep, force=None):
        return self.runtime.decide(branch, timestep, force, expert=self.name)

    def step_time(self, timestep):
        return self.runtime.step_time(timestep)

    def finish(self, branch, h_in, h_out):
        self.runtime.finish(branch, h_in, h_out)

    @property
    def level(self) -> str:
        return self.runtime.level

    def reset(self):
        self.runtime.reset()


_DISABLE = {
    "a diffusers cache (transformer.enable_cache)": "call transformer.disable_cache()",
    "cache-dit (cache_dit.enable_cache)": "call cache_dit.disable_cache(pipe)",
}
# cache-dit enabled after tcpade.apply saves the forward that diffusers' hook registry wraps, and
# its disable_cache cannot always restore it: that pipeline is best built again.
_UNDO = {
    "a diffusers cache (transformer.enable_cache)": "call transformer.disable_cache() (or tcpade.remove(...))",
    "cache-dit (cache_dit.enable_cache)": "call tcpade.remove(...), then cache_dit.disable_cache(pipe) (which "
    "cannot always restore a transformer it was enabled on after tcpade: enable cache-dit only on a pipeline "
    "without tcpade)",
}


def _other_cache(module) -> Optional[str]:
    """Which other cache is enabled on ``module``: diffusers' ``enable_cache`` (FirstBlockCache,
    FasterCache, MagCache, TaylorSeer, ...: ``_cache_config``) or cache-dit (``_is_cached``)."""
    module = getattr(module, "_orig_mod", module)
    if getattr(module, "_cache_config", None) is not None:
        return "a diffusers cache (transformer.enable_cache)"
    if getattr(module, "_is_cached", False):
        return "cache-dit (cache_dit.enable_cache)"
    return None


class _Guard:
    """Runtime.guard: refuses a call once another cache has been enabled on a transformer after
    tcpade.apply (it would predict on top of tcpade's predictions: two caches at once)."""

    def __init__(self, modules):
        self.modules = modules

    def __call__(self) -> None:
        for module in self.modules:
            other = _other_cache(module)
            if other is not None:
                raise RuntimeError(
                    f"{other} was enabled on this {type(getattr(module, '_orig_mod', module)).__name__} after "
                    f"tcpade.apply: two caches cannot run at once; {_UNDO[other]}")


def apply(target, config: Optional[TCPadeConfig] = None, *, num_steps: Optional[int] = None) -> Runtime:
    """Make ``target`` (pipeline or transformer) skip block-stack passes by TC-Pade.

    num_steps: the number of steps of each run, for a bare transformer (a pipeline's own
    scheduler says it, and wins over ``num_steps`` with a warning when they differ).
    Refuses a target that already has tcpade applied (remove it first, or apply a new
    config through ``remove`` + ``apply``). Returns the Runtime (its ``branches`` hold
    the per-branch state and step records). ``config`` is kept as given (``runtime.config``);
    what is resolved for this model (its calibrated schedules, the predictor of
    ``calibrated_predictor``) is ``runtime.resolved``, shown by ``summary``.
    """
    config = config if config is not None else TCPadeConfig()
    if not isinstance(config, TCPadeConfig):
        raise TypeError(f"config must be a TCPadeConfig, got {type(config).__name__}")
    pipe, transformer = _split(target)
    adapters = _adapters()
    if adapters.is_attached(transformer):
        raise RuntimeError(
            "tcpade is already applied to this transformer; call tcpade.remove(...) before applying it again"
        )
    adapters.find_adapter(transformer)  # a clear TypeError for an unsupported model
    experts = _experts(pipe)
    for expert in experts:
        if adapters.is_attached(expert):
            raise RuntimeError("tcpade is already applied to this pipeline's transformer_2; call tcpade.remove first")
        adapters.find_adapter(expert)
    for module in [transformer] + experts:
        other = _other_cache(module)
        if other is not None:
            raise RuntimeError(f"{other} is enabled on this {type(module).__name__}: two caches cannot run at once; "
                               f"{_DISABLE[other]} before tcpade.apply")  # fmt: skip
    # A budget takes this model's calibrated schedules from the registry (tcpade.policy.schedules),
    # kept beside the config, which stays the user's.
    resolved = schedules.resolve(config, transformer)
    # T and the step's time come from the scheduler of the pipeline that is calling: the one given
    # here, or one derived from it (from_pipe: its own scheduler), found per call (_Caller).
    caller = _Caller(pipe, transformer) if pipe is not None else None
    runtime = Runtime(config, total_steps=_scheduler_steps(caller) if pipe is not None else None,
                      num_steps=num_steps, clock=_SchedulerClock(caller) if pipe is not None else None,
                      resolved=resolved)  # fmt: skip
    # Under diffusers' context parallelism (enabled before or after this call) the TSI sums
    # are summed over the ranks, so every rank takes the same decision (tcpade.distributed).
    runtime.guard = _Guard([transformer] + experts)
    distributed.follow_context_parallel(runtime, transformer)
    adapters.attach(transformer, runtime)
    setattr(transformer, RUNTIME_ATTR, runtime)
    for name, expert in zip(_EXPERTS, experts):
        adapters.attach(expert, _Expert(runtime, name))
        setattr(expert, RUNTIME_ATTR, runtime)
    return runtime


def remove(target) -> None:
    """Take tcpade off ``target``; afterwards it computes exactly what it did before."""
    pipe, transformer = _split(target)
    adapters = _adapters()
    if not adapters.is_attached(transformer):
        raise RuntimeError("tcpade is not applied to this transformer")
    for module in [transformer] + _experts(pipe):
        if adapters.is_attached(module):
            adapters.detach(module)
        if hasattr(module, RUNTIME_ATTR):
            delattr(module, RUNTIME_ATTR)


def runtime(target) -> Runtime:
    """The Runtime tcpade applied to ``target`` (pipeline or transformer)."""
    _split(target)  # a clear TypeError for anything else
    return attached_runtime(target)


@dataclass
class Summary:
    """Per CFG branch: which calls were computed or skipped, why, the TSI and stage.

    ``config`` is the user's; ``resolved`` what ran of it on the model (the predictor, and the
    calibrated schedules the plans came from; None: the config alone)."""

    config: TCPadeConfig
    branches: Dict[str, List[StepRecord]]
    history_bytes: int
    resolved: Optional[Resolved] = None
    # per branch, the run's time per step where the runtime knew them (the spaced rule's axis)
    times: Optional[Dict[str, Optional[tuple]]] = None

    def __post_init__(self):
        if self.resolved is None:
            self.resolved = Resolved(self.config)
        if self.times is None:
            self.times = {}

    def computed(self, branch: str) -> List[int]:
        return [r.k for r in self.branches[branch] if r.computed]

    def skipped(self, branch: str) -> List[int]:
        return [r.k for r in self.branches[branch] if not r.computed]

    def nonfinite(self, branch: str) -> List[int]:
        return [r.k for r in self.branches[branch] if r.nonfinite]

    def choices(self, branch: str) -> List[Tuple[int, str]]:
        """Predictor "auto": (step, candidate) for each computed step that chose the candidate
        the following skips use (its probe measured both)."""
        return [(r.k, r.choice) for r in self.branches[branch] if r.choice]

    @property
    def empty(self) -> bool:
        """True when no transformer call has been recorded yet (nothing to summarise)."""
        return not any(self.branches.values())

    def __str__(self) -> str:
        c, ran = self.config, self.resolved
        predictor, others = c.predictor, ran.predictors[1:]
        if others:  # calibrated schedules of other predictors: each runs with its own
            them = "it" if len(others) == 1 else "them"
            predictor = (f"{', '.join(others)} on the calibrated schedules made for {them}, {c.predictor} "
                         "(the config's) on the others")  # fmt: skip
        lines = [
            f"tcpade: predictor={predictor}{' level=output' if c.level == 'output' else ''}"
            f"{' extrapolate=h_out' if c.level == 'block' and c.extrapolate == 'h_out' else ''} {_decided_by(c)}; "
            f"history {self.history_bytes / 2**20:.2f} MiB",
        ]
        if self.empty:
            lines.append("nothing has run yet: no transformer call since tcpade.apply (run the pipeline first)")
        for name, recs in self.branches.items():
            n = len(recs)
            comp = sum(r.computed for r in recs)
            ratio = f"{n / comp:.2f}x fewer block-stack passes" if comp else "no pass computed"
            lines.append(f"\nbranch {name!r}: {comp}/{n} computed ({ratio}); skipped {self.skipped(name)}")
            t = c.schedule_steps or n  # (a fixed schedule is for its own T, also in a run cut short)
            times = self.times.get(name) if self.times.get(name) is not None and len(self.times[name]) == t else None
            if t and ran.plan(t, times) is not None:
                note = ran.plan_note(t, times)  # a calibrated schedule's held-out check against the spaced rule
                source = ran.plan_source(t, times)
                if source == "spaced rule" and schedules.time_axis_weights(times, t, c.time_spacing) is not None:
                    source += f" on the run's times (time_spacing={c.time_spacing:g})"
                lines.append(f"  schedule: {source} {list(ran.plan(t, times))}" + (f" ({note})" if note else "")
                             + (f"; predictor {ran.predictor_for(t, times)}" if others else ""))
            bad = self.nonfinite(name)
            if bad:
                kept = ran.plan(t, times) is not None
                then = ("the fixed schedule was kept; non-finite predicted elements fell back to h_in + R1" if kept
                        else "computed fully from there on")  # fmt: skip
                lines.append(f"  non-finite values at steps {bad}: {then}")
            picks = self.choices(name)
            if picks:
                lines.append("  auto predictor, chosen at computed steps: "
                             + " ".join(f"{k}:{choice}" for k, choice in picks))  # fmt: skip
            lines.append("  step | stage  | action  | reason     | TSI    | error")
            for r in recs:
                tsi = "  -   " if math.isnan(r.tsi) else f"{r.tsi:.4f}"
                err = "  -   " if math.isnan(r.error) else f"{r.error:.2e}"
                act = "compute" if r.computed else "skip"
                lines.append(f"  {r.k:4d} | {r.stage:6s} | {act:7s} | {r.reason:10s} | {tsi} | {err}")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Write a PNG of the TSI and the compute/skip decisions per step, per branch."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("Summary.plot needs matplotlib: pip install 'tcpade[plot]'") from exc
        if self.empty:
            raise RuntimeError("Summary.plot: nothing to plot, no transformer call has run yet (run the pipeline first)")
        fig, axes = plt.subplots(len(self.branches) or 1, 1, figsize=(8, 2.6 * max(1, len(self.branches))),
                                 squeeze=False)  # fmt: skip
        for ax, (name, recs) in zip(axes[:, 0], self.branches.items()):
            ks = [r.k for r in recs]
            ax.plot(ks, [r.tsi for r in recs], "o-", color="tab:blue", label="TSI")
            for r in recs:
                ax.axvspan(r.k - 0.5, r.k + 0.5, color="tab:green" if r.computed else "tab:orange", alpha=0.15)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"branch {name!r}: green = computed, orange = skipped")
            ax.set_xlabel("step")
            ax.set_ylabel("TSI")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _decided_by(c: TCPadeConfig) -> str:
    """What decides the skips of ``c``, for the summary's header (a schedule or a budget overrides
    the policy fields)."""
    if c.schedule is not None:
        return f"schedule={len(c.schedule)}/{c.schedule_steps}"
    if c.passes is not None:
        return f"budget=passes {c.passes}"
    if c.speedup is not None:
        return f"budget=speedup {c.speedup:g}"
    return f"policy={c.policy}"


def summary(target) -> Summary:
    """The step records of a pipeline, transformer or Runtime (the last run of each branch), their
    device sums read (one host wait per branch that has unread ones)."""
    rt = target if isinstance(target, Runtime) else runtime(target)
    return Summary(rt.config, {n: list(rt.records(n)) for n in rt.branches}, rt.nbytes, rt.resolved,
                   {n: b.run.times for n, b in rt.branches.items()})
