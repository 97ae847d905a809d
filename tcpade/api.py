"""The user-facing calls: apply, remove, summary.

    import tcpade
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    image = pipe(prompt, num_inference_steps=20).images[0]
    print(tcpade.summary(pipe))
    tcpade.remove(pipe)

``apply`` takes a diffusers pipeline (its ``transformer`` is hooked, and the number of
steps of each run is read from the pipeline's noise scheduler) or a supported
transformer (then pass ``num_steps``, or call ``runtime(transformer).set_steps(T)``
before each run). Integration goes through diffusers' hook registry only; ``remove``
takes every hook off again, after which the model computes exactly what it did before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import distributed, schedules
from .config import TCPadeConfig
from .policy import Runtime, StepRecord

_ATTR = "_tcpade_runtime"


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
    def steps() -> Optional[int]:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) > 0 else None

    return steps


def apply(target, config: Optional[TCPadeConfig] = None, *, num_steps: Optional[int] = None) -> Runtime:
    """Make ``target`` (pipeline or transformer) skip block-stack passes by TC-Pade.

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
    # A budget takes this model's calibrated schedules from the registry (tcpade.schedules).
    config = schedules.resolve(config or TCPadeConfig(), transformer)
    runtime = Runtime(config, total_steps=_scheduler_steps(pipe) if pipe is not None else None)
    if num_steps is not None:
        runtime.set_steps(num_steps)
    # Under diffusers' context parallelism (enabled before or after this call) the TSI sums
    # are summed over the ranks, so every rank takes the same decision (tcpade.distributed).
    distributed.follow_context_parallel(runtime, transformer)
    adapters.attach(transformer, runtime)
    setattr(transformer, _ATTR, runtime)
    return runtime


def remove(target) -> None:
    """Take tcpade off ``target``; afterwards it computes exactly what it did before."""
    _, transformer = _split(target)
    adapters = _adapters()
    if not adapters.is_attached(transformer):
        raise RuntimeError("tcpade is not applied to this transformer")
    adapters.detach(transformer)
    if hasattr(transformer, _ATTR):
        delattr(transformer, _ATTR)


def runtime(target) -> Runtime:
    _, transformer = _split(target)
    rt = getattr(transformer, _ATTR, None)
    if rt is None:
        raise RuntimeError("tcpade is not applied to this transformer")
    return rt


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

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"tcpade: predictor={c.predictor} policy={c.policy}; history {self.history_bytes / 2**20:.2f} MiB",
        ]
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
                lines.append(f"  non-finite values at steps {bad}: computed fully from there on")
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
            raise ImportError("Summary.plot needs matplotlib (pip install matplotlib)") from exc
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


def summary(target) -> Summary:
    """The step records of a pipeline, transformer or Runtime (the last run of each branch)."""
    rt = target if isinstance(target, Runtime) else runtime(target)
    return Summary(rt.config, {n: list(b.records) for n, b in rt.branches.items()}, rt.nbytes)
