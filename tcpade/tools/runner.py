"""One way to run a model with a config, for ``bench`` and ``calibrate``.

A runner holds a model and its inputs and runs all of them with one config (None: full
computation, tcpade not attached) each time :meth:`run` is called; the result is a :class:`Run`:
the outputs stacked, and per model call tcpade's summary (None without a config), from which
the pass counts come. Three kinds of model:

* :class:`ZooRunner`: a zoo model (``tcpade.zoo.ZooModel``), one batched ``sample`` call;
* :class:`PipelineRunner`: a diffusers pipeline, one call per input (its call kwargs; a
  ``"seed"`` key becomes a CPU ``torch.Generator``), the output turned into a tensor by ``convert``;
* :class:`TransformerRunner`: a bare transformer and a noise scheduler, one ``tcpade.sample`` per input.

:func:`load_pipeline` loads a local diffusers pipeline folder for the ``tcpade`` subcommands.
Importing this module imports no torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .args import UsageError


@dataclass
class Run:
    """What one :meth:`run` gave: ``outputs`` (the inputs' outputs, concatenated along the batch)
    and ``summaries`` (tcpade's summary per model call; None where it ran without a config)."""

    outputs: object
    summaries: List[object] = field(default_factory=list)

    @property
    def _summaries(self):
        return [s for s in self.summaries if s is not None]

    @property
    def passes(self) -> List[int]:
        """Per model call: block-stack passes (the most of any branch); empty without a config."""
        return [max(len(s.computed(b)) for b in s.branches) for s in self._summaries]

    @property
    def steps(self) -> List[int]:
        """Per model call: transformer calls (the most of any branch); empty without a config."""
        return [max(len(r) for r in s.branches.values()) for s in self._summaries]

    @property
    def calls(self) -> int:
        """Transformer calls that computed the block stack, every branch and call together."""
        return sum(len(s.computed(b)) for s in self._summaries for b in s.branches)

    @property
    def times(self):
        """The run's time per step as the runtime knew them (the spaced rule's axis), from the
        first call that had them; None where none did (full computation, an unknown clock)."""
        return next((t for s in self._summaries for t in (s.times or {}).values() if t is not None), None)

    @property
    def branches(self) -> int:
        """Branches (cond / uncond) of the last call with a config; 1 without one."""
        done = self._summaries
        return len(done[-1].branches) if done else 1


class ZooRunner:
    """A zoo model: every (seed, label) input in one batched ``ZooModel.sample`` call."""

    def __init__(self, model, seeds, labels, steps: int):
        self.model, self.steps = model, steps
        self.seeds, self.labels = list(seeds), list(labels)
        self.transformer = model.transformer

    def run(self, config) -> Run:
        if config is None:
            return Run(self.model.sample(self.seeds, self.labels, steps=self.steps), [None])
        images, summ = self.model.sample(self.seeds, self.labels, steps=self.steps, config=config, return_summary=True)
        return Run(images, [summ])


class PipelineRunner:
    """A diffusers pipeline: one call per input (its call kwargs; ``"seed"``: a CPU generator with
    that seed), ``num_inference_steps=steps``; ``convert`` turns a call's output (the first item
    of its ``return_dict=False`` tuple) into a tensor with a batch dimension."""

    def __init__(self, pipe, inputs, steps: int, convert: Callable):
        self.pipe, self.steps, self.convert = pipe, steps, convert
        self.inputs = [dict(kw) for kw in inputs]
        self.transformer = pipe.transformer

    def _call(self, kw):
        import torch

        kw = dict(kw)
        if "seed" in kw:
            kw["generator"] = torch.Generator(device="cpu").manual_seed(int(kw.pop("seed")))
        return self.convert(self.pipe(**kw, num_inference_steps=self.steps, return_dict=False)[0])

    def run(self, config) -> Run:
        import torch

        from ..integrations import api

        if config is None:
            return Run(torch.cat([self._call(kw) for kw in self.inputs]), [None] * len(self.inputs))
        outs, summaries = [], []
        api.apply(self.pipe, config)
        try:
            for kw in self.inputs:
                outs.append(self._call(kw))
                summaries.append(api.summary(self.pipe))
        finally:
            api.remove(self.pipe)
        return Run(torch.cat(outs), summaries)


class TransformerRunner:
    """A bare transformer: one ``tcpade.sample`` per input (its kwargs), on a copy of ``scheduler``."""

    def __init__(self, transformer, scheduler, inputs, steps: int):
        self.transformer, self.scheduler, self.steps, self.inputs = transformer, scheduler, steps, list(inputs)

    def run(self, config) -> Run:
        import torch

        from ..integrations.sampling import sample

        outs, summaries = [], []
        for kw in self.inputs:
            sched = copy.deepcopy(self.scheduler)
            if config is None:
                out, summ = sample(self.transformer, sched, steps=self.steps, progress=False, **kw), None
            else:
                out, summ = sample(self.transformer, sched, steps=self.steps, config=config, return_summary=True,
                                   progress=False, **kw)  # fmt: skip
            outs.append(out.float())
            summaries.append(summ)
        return Run(torch.cat(outs), summaries)


def load_pipeline(path: str, flag: str, *, what: str = "", dtype=None, device: Optional[str] = None):
    """The diffusers pipeline in the local folder ``path`` (nothing downloaded), its progress bars
    off, or UsageError naming ``flag`` (no pipeline there, or one without a transformer ``what``
    names the use of: " to calibrate")."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils
    from diffusers.utils import logging as diffusers_logging

    try:  # loading bars would go to stderr
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    diffusers_logging.disable_progress_bar()
    kw = {}
    if dtype is not None:  # diffusers renamed torch_dtype to dtype (the old name warns)
        kw["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kw, local_files_only=True)
        if device is not None:
            pipe = pipe.to(device)
    except ImportError:
        raise
    except Exception as exc:  # no model_index.json, a missing or broken component, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{flag}: cannot load a diffusers pipeline from {path!r}: {msg}") from None
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise UsageError(f"{flag}: {type(pipe).__name__} in {path!r} has no transformer{what}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning(pipe) -> Optional[str]:
    """What the pipeline's ``__call__`` is conditioned on: "labels" (class labels, no prompt),
    "prompt", or None (neither)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if "class_labels" in params and "prompt" not in params:
        return "labels"
    return "prompt" if "prompt" in params else None


def check_class_labels(pipe, ids) -> None:
    """UsageError (naming ``--labels``) unless every class id is one the class-conditional
    pipeline's transformer has (``num_embeds_ada_norm`` classes; >= 0 where it says none)."""
    n = getattr(pipe.transformer.config, "num_embeds_ada_norm", None)
    bad = [i for i in ids if i < 0 or (n is not None and i >= n)]
    if bad:
        raise UsageError(f"--labels: {type(pipe).__name__} has classes 0..{n - 1}, got {bad}" if n
                         else f"--labels must be >= 0, got {bad}")  # fmt: skip
