"""The user-facing calls: apply, remove, summary.

    import tcpade
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    image = pipe(prompt, num_inference_steps=20).images[0]
    print(tcpade.summary(pipe))
    tcpade.remove(pipe)

``apply`` takes a diffusers pipeline (its ``transformer`` is hooked, and the number of
steps of each run is read from the pipeline's noise scheduler) or a supported
transformer (then pass ``num_steps``, the length of its runs; a run of another length
is warned about once, and a longer one is computed in full from step ``num_steps`` on).
Integration goes through diffusers' hook registry only; ``remove`` takes every hook off
again, after which the model computes exactly what it did before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import distributed, schedules
from .config import TCPadeConfig
from .policy import RUNTIME_ATTR, Runtime, StepRecord, attached_runtime


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


def _scheduler_steps(pipe):
    """T of the pipeline's current run: the scheduler's timesteps from its begin index on.

    img2img and inpainting pipelines set all timesteps and start the loop part-way
    (``scheduler.set_begin_index(t_start)``, strength 0.6 of 20 steps: 12 run); a
    text-to-image run leaves the begin index at None or 0."""

    def steps() -> Optional[int]:
        scheduler = getattr(pipe, "scheduler", None)
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
        self.pipe = pipe
        self.reads = 0
        self._source: Optional[torch.Tensor] = None
        self._host: List[float] = []

    def __call__(self) -> Optional[float]:
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or not hasattr(scheduler, "step_index"):
            return None
        if hasattr(pipe, "_current_timestep") and pipe._current_timestep is None:
            return None
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None) or 0
        if timesteps is not self._source:
            self._host = [float(t) for t in timesteps.reshape(-1).tolist()]
            self._source = timesteps
            self.reads += 1
        return self._host[index] if 0 <= index < len(self._host) else None


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


def apply(target, config: Optional[TCPadeConfig] = None, *, num_steps: Optional[int] = None) -> Runtime:
    """Make ``target`` (pipeline or transformer) skip block-stack passes by TC-Pade.

    num_steps: the number of steps of each run, for a bare transformer (a pipeline's own
    scheduler says it, and wins over ``num_steps`` with a warning when they differ).
    Refuses a target that already has tcpade applied (remove it first, or apply a new
    config through ``remove`` + ``apply``). Returns the Runtime (its ``branches`` hold
    the per-branch state and step records).
    """
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
    # A budget takes this model's calibrated schedules from the registry (tcpade.schedules).
    config = schedules.resolve(config or TCPadeConfig(), transformer)
    runtime = Runtime(config, total_steps=_scheduler_steps(pipe) if pipe is not None else None,
                      num_steps=num_steps, clock=_SchedulerClock(pipe) if pipe is not None else None)  # fmt: skip
    # Under diffusers' context parallelism (enabled before or after this call) the TSI sums
    # are summed over the ranks, so every rank takes the same decision (tcpade.distributed).
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
    """Per CFG branch: which calls were computed or skipped, why, the TSI and stage."""

    config: TCPadeConfig
    branches: Dict[str, List[StepRecord]]
    history_bytes: int

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
        c = self.config
        lines = [
            f"tcpade: predictor={c.predictor}{' level=output' if c.level == 'output' else ''} {_decided_by(c)}; "
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
            if t and c.plan(t) is not None:
                lines.append(f"  schedule: {c.plan_source(t)} {list(c.plan(t))}")
            bad = self.nonfinite(name)
            if bad:
                kept = c.plan(n) is not None
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
    """The step records of a pipeline, transformer or Runtime (the last run of each branch)."""
    rt = target if isinstance(target, Runtime) else runtime(target)
    return Summary(rt.config, {n: list(b.records) for n, b in rt.branches.items()}, rt.nbytes)
