"""Attach a TC-Padé controller to an unchanged diffusers transformer, through diffusers' own hooks.

What is cached (docs/method.md section 1): per transformer call, ``h_in`` = the image-token hidden states
entering the FIRST transformer block, and ``h_out`` = the image-token hidden states leaving the
LAST transformer block (before ``norm_out`` / ``proj_out``). On a skipped call no transformer
block runs; the embeddings before the stack and the output norm / projection after it run
as usual, because they are outside the block stack.

Design (modelled on ``diffusers/hooks/first_block_cache.py``): nothing replaces a module's
``forward``; the hooks are ``diffusers.hooks.ModelHook``s in the modules' ``HookRegistry`` plus
two torch hooks on the transformer and two on the stack's first block:

* before the transformer's forward (a torch forward pre-hook, eager even when the transformer is
  compiled whole): the branch is read (the name of the active cache context, ``"default"`` when
  none is set) with the ``timestep`` argument, and ``controller.decide(branch, timestep, force)``
  settles the call: None (compute) or a prediction callable (skip). The ``tcpade_root``
  ModelHook on the transformer is stateful, so ``transformer.cache_context(name)`` reaches its
  ``StateManager`` and a pipeline's hook reset reaches the controller.
* ``tcpade_block`` on every block of the stack. Traceable: it reads the decision as one small
  int (``mode``) and runs only tensor and custom ops, so a compiled block region
  (``compile_repeated_blocks(fullgraph=True)``) has no graph break and two variants per block
  class, the same for every block of the class:
  - compute: every block runs its original forward; each block's image output is kept as
    ``h_out``;
  - skip: no block's forward runs; each block hook returns that block's normal return structure
    built from its inputs (text tokens pass through).
  What only the first block does is in its torch forward hook (``after_block``, traceable
  too; a frame of its own under a regional compile): compute: that block's input is kept as
  ``h_in``; skip: it calls the prediction on its ``h_in`` and puts it in as the image part of
  the block's output, so whatever the model does between blocks, the stack leaves with the
  predicted ``h_out``. (diffusers runs every hooked module's forward through one shared code
  object, so the compiled variants of all hooked blocks of all classes count against one
  recompile limit: keeping them uniform keeps them few, see ``_BlockHook``.)
* after the forward (a torch forward hook, eager): ``controller.finish(branch, h_in, h_out)``
  (None, None for a skipped call) stores the residual and keeps the books.

* output level (a controller whose ``level`` is ``"output"``, ``TCPadeConfig(level="output")``):
  the block hooks stand aside; a skipped call is answered by the ``tcpade_root`` hook's
  ``new_forward`` without running any of the forward: the prediction callable is called with
  None (the output is its own residual) and its tensor returned as the call asked
  (``(sample,)`` for ``return_dict=False``, else the output class the computed calls returned).
  A computed call runs the forward as it is and ``finish`` gets (None, the returned tensor).
  A skip whose input (``hidden_states``: shape, dtype, device) differs from the branch's last
  computed call is computed after all. Transformers that return one tensor per image (Z-Image)
  are refused at ``attach``.
* branches: the name of the active cache context (``"default"`` when none is set). A pipeline
  that runs classifier-free guidance as two calls per step without cache contexts (FluxImg2Img,
  FluxKontext) gets ``"default"`` and ``"default.2"``: outside a cache context, the n-th call
  in a row at one timestep is branch ``"default.n"`` (up to ``"default.4"``).
* threads: the cache context (the branch name) and the count of calls per timestep are per
  thread, and the transformer's forward is taken in turns (``_CallLock``, held from the pre-hook
  to the forward hook), so that the call state the block hooks read belongs to one call while
  the controller keeps each thread's histories (pipelines that share the transformer through
  ``from_pipe`` run in threads at once).
* ControlNet: a call that gets any of the adapter's ``control_args`` (block-level control
  residuals added between blocks) is computed: ``controller.decide(..., force="control")``.

On a skipped call the first block returns the prediction; every later block returns its own
input stream (its text input passed through), which already holds the prediction and whatever
the transformer concatenated to it between the lists (FLUX.2, Chroma, HiDream). Text tokens are
never predicted separately: where the blocks carry text next to the image stream, the stack
leaves with the text stream that entered it, which is harmless for every supported family
because what follows the stack uses the image tokens only (checked per family by the
self-check in tests/test_families.py; ``tcpade.integrations.families.FAMILIES`` says what runs after the
stack). Where the stream is a joint image+text sequence (Z-Image, Lumina2) it is predicted whole.

Recipe: adding a model family
-----------------------------
The tables live in ``tcpade/integrations/families.py`` (``SUPPORTED`` below is ``FAMILIES``).

1. ``families.FAMILIES[transformer class name]``: a ``Family`` with ``stacks``, the names of the
   ``nn.ModuleList`` attributes that form the block stack, in the order the transformer's
   ``forward`` runs them (FLUX: ``("transformer_blocks", "single_transformer_blocks")``; not
   refiner lists that run on the text or the image alone before the stack, like Z-Image's
   ``noise_refiner``); ``timestep_arg``, the name of the ``forward``'s timestep parameter;
   ``control_args``, the ``forward`` parameters that carry block-level ControlNet residuals;
   ``list_output`` if it returns one tensor per image. A comment at the entry says what the
   ``forward`` does after the stack; ``docs/models.md`` gets a row (pipelines, CFG form, tests).
2. The block classes: if diffusers' ``TransformerBlockRegistry`` registers them (which argument
   is the stream, which return index is the image / text stream) nothing is needed. Otherwise,
   or where the registry is wrong for tcpade's use, add a ``BlockSpec`` to
   ``families.OWN_BLOCKS``: ``hidden_arg`` (the stream's parameter), ``encoder_arg`` (the text
   stream that passes through), ``image_index`` / ``encoder_index`` in the returned tuple
   (``image_index=None``: the block returns a tensor), ``tokens="last"`` / ``"first"`` if the
   block's stream is a concatenation whose image part is the last / first n tokens (n = h_in's
   token count), ``context_pre_only`` if a block built so returns None as its text stream.
   Subclass ``BlockSpec`` for anything else (``families._HiDreamBlockSpec``).
3. Read the transformer's ``forward`` after the loop: ``norm_out``/``proj_out`` must use the
   image tokens only (else text tokens would have to be predicted too) and nothing after the
   loop may call a block's ``forward`` (calling a block's submodule, like DiT's
   ``transformer_blocks[0].norm1.emb``, is fine: hooks sit on the block, not on its children).
4. Add a tiny builder to ``tcpade/tools/tiny.py`` (``TINY``): ``test_self_check`` then proves the
   adapter (a call skipped with the exact residual of the same call must give the computed output bit for
   bit), and ``test_fast_run`` runs it for 20 steps.

``attach`` checks the block classes and their ``forward`` parameters against the specs and
raises ``TypeError`` when they do not match, so a diffusers release that changes a block's
signature fails loudly.

Limits: inference only (under gradient checkpointing a backward recompute of a skipped block
would run its real forward); ControlNet residuals are honoured by computing the calls that
carry them, so a ControlNet run gets no speed-up from tcpade; compile the transformer only
after ``attach`` (a graph traced before it does not contain the hooks).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import ContextParallelSplitHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..policy.config import LEVELS
from . import families
from .families import BlockSpec, Family

__all__ = [
    "BlockSpec",
    "Controller",
    "Family",
    "SUPPORTED",
    "attach",
    "cache_context",
    "detach",
    "find_adapter",
    "is_attached",
]

ROOT_HOOK = "tcpade_root"
BLOCK_HOOK = "tcpade_block"
DEFAULT_BRANCH = "default"


class Controller(Protocol):
    def decide(self, branch: str, timestep, force: Optional[str] = None) -> Optional[Callable]:
        """Called once per transformer call, before its forward runs (eager, never traced).
        ``timestep``: the call's time as a host float (from the controller's ``step_time`` when
        it has that method, else from the call's timestep argument).

        Return None to run the blocks normally, or a callable to skip every block: the first
        block that runs calls it with ``h_in`` and it returns the predicted image ``h_out``
        (same shape/dtype/device as ``h_in``), or None to compute this call after all. It runs
        inside the compiled block region when the blocks are compiled: tensor and custom ops
        only. ``force``: a reason this call must be computed ("control": it carries ControlNet
        residuals), or None; the controller must then return None.
        """
        ...

    def finish(self, branch: str, h_in: Optional[torch.Tensor], h_out: Optional[torch.Tensor]) -> None:
        """Called once per transformer call, after its forward (eager). A computed call passes the
        image tokens entering the first block and leaving the last (``h_out`` goes on into
        ``norm_out``: read or copy them, never modify them in place); a skipped call passes None, None.
        """
        ...

    # Optional: ``level`` ("block" when absent): "output" makes a skipped call predict the whole
    # transformer output (the callable gets None instead of h_in and returns the output tensor)
    # and a computed call pass ``finish(branch, None, output)``.
    # Optional: ``reset()``. If the controller has it, it is called when diffusers resets the stateful
    # hooks of the transformer (``pipeline.maybe_free_model_hooks()`` at the end of every pipeline call,
    # for transformers with ``CacheMixin``), i.e. when a generation ends.


# --------------------------------------------------------------------------------------------------
# Families (tcpade.integrations.families): which modules form the stack, where h_in and h_out live.
# --------------------------------------------------------------------------------------------------


_param_names = families.param_names


class _ArgReader:
    """Reads a named argument of a ``forward`` call, given positionally or by keyword."""

    def __init__(self, fn, name: str):
        params = inspect.signature(fn).parameters
        names = _param_names(fn)
        if name not in names:
            raise TypeError(f"{getattr(fn, '__qualname__', fn)} has no parameter {name!r}")
        self.name = name
        self.index = names.index(name)
        default = params[name].default
        self.default = None if default is inspect.Parameter.empty else default

    def __call__(self, args: tuple, kwargs: dict):
        if self.name in kwargs:
            return kwargs[self.name]
        if self.index < len(args):
            return args[self.index]
        return self.default

    def replace(self, args: tuple, kwargs: dict, fn: Callable) -> Tuple[tuple, dict]:
        """``(args, kwargs)`` with the argument, where the call gave it, replaced by ``fn(it)``."""
        if self.name in kwargs:
            return args, {**kwargs, self.name: fn(kwargs[self.name])}
        if self.index < len(args):
            return args[: self.index] + (fn(args[self.index]),) + args[self.index + 1 :], kwargs
        return args, kwargs


# The families tcpade supports, by transformer class name (``families.FAMILIES``): the stack lists,
# the timestep and control arguments; the block specs come from diffusers' TransformerBlockRegistry
# and ``families.OWN_BLOCKS``.
SUPPORTED: Dict[str, Family] = families.FAMILIES


# diffusers keeps a module's HookRegistry in this attribute and has no public way to ask whether a
# module has one without creating it (``HookRegistry.check_if_exists_or_initialize`` creates it);
# detach deletes the attribute where attach created it, so the module is left as it was.
# tests/test_diffusers_internals.py fails by name if diffusers renames it.
_REGISTRY_ATTR = "_diffusers_hook"


def _registry_of(module: torch.nn.Module) -> Optional[HookRegistry]:
    """The module's diffusers HookRegistry, or None (none is created)."""
    return getattr(module, _REGISTRY_ATTR, None)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile'd module -> the module it wraps


def find_adapter(transformer) -> Family:
    """The family of this transformer's class (or of a base class of it): where its stack is."""
    cls = type(_unwrap(transformer))
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED:
            return SUPPORTED[base.__name__]
    raise TypeError(
        f"tcpade has no adapter for {cls.__name__}. Supported transformers: {', '.join(sorted(SUPPORTED))}. "
        "To add a model family, follow the adapter recipe in the docstring of tcpade/integrations/adapters.py "
        "and add it to tcpade.integrations.families.FAMILIES."
    )


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


class _NoState(BaseState):
    # The per-branch state lives in the controller; the StateManager only carries the context name.
    def reset(self, *args, **kwargs) -> None:
        pass


class _ThreadContext(StateManager):
    """diffusers' StateManager with the cache context per thread: ``transformer.cache_context(name)``
    in one thread names the branch of that thread's calls only (two pipelines that share the
    transformer, run in two threads, each enter "cond" and "uncond" on their own)."""

    def __init__(self, *args, **kwargs):
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def _context(self):
        return getattr(self._local, "context", None)

    @_context.setter
    def _context(self, value) -> None:
        self._local.context = value


def _call_frame(module):
    """The frame of the transformer call in flight (torch's ``_call_impl`` of ``module``), seen
    from its forward pre-hook; None if not found."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is module:
            return frame
        frame = frame.f_back
    return None


def _left(thread: int, frame_id: int) -> bool:
    """Has thread ``thread`` left the call whose frame had id ``frame_id`` (or ended)?"""
    f = sys._current_frames().get(thread)
    while f is not None:
        if id(f) == frame_id:
            return False
        f = f.f_back
    return True


class _CallLock:
    """One transformer call at a time per transformer, from the root hook's ``before`` to its
    ``after``: the call state (``_CallState``, which the traced block hooks read as plain
    attributes) belongs to that call, while the histories are the calling thread's (the
    Runtime's branches). Threads that share a transformer run everything else at once (their
    schedulers, VAEs, text encoders) and take turns for the transformer's forward.

    A call that never reaches ``after`` (torch skips its always-called hooks on a
    ``BaseException`` such as ``KeyboardInterrupt``) leaves the lock with its thread: that
    thread's next call goes on, and another thread takes it over once the holder has left
    that call (its frame is off the holder's stack) or ended."""

    POLL_S = 0.05

    def __init__(self):
        self._lock = threading.Lock()
        self._guard = threading.Lock()  # ownership changes
        self.owner: Optional[int] = None
        self.frame = 0  # id of the holder's call frame (0: unknown, never taken over while it runs)

    def acquire(self, frame) -> None:
        me, fid = threading.get_ident(), id(frame) if frame is not None else 0
        with self._guard:
            if self.owner == me:  # this thread's previous call did not reach `after`
                self.frame = fid
                return
        while not self._lock.acquire(timeout=self.POLL_S):
            with self._guard:
                owner, held = self.owner, self.frame
                if owner is not None and owner != me and (
                        owner not in sys._current_frames() or (held and _left(owner, held))):  # fmt: skip
                    self.owner, self.frame = me, fid  # the lock stays locked, now for this call
                    return
        with self._guard:
            self.owner, self.frame = me, fid

    def release(self) -> None:
        with self._guard:
            if self.owner != threading.get_ident():
                return
            self.owner, self.frame = None, 0
        self._lock.release()


# A block hook's mode in the call in flight: one small int, so that a compiled block region guards
# on one value (diffusers runs every hooked module's forward through one shared code object, whose
# compiled variants count against dynamo's recompile limit together).
_PLAIN, _COMPUTE, _SKIP = 0, 1, 2


@dataclass
class _CallState:
    """The transformer call in flight, shared by the root hook and the block hooks. The block
    hooks read ``mode`` (dynamo guards on its value: a compiled block region has a compute and
    a skip variant) and store tensors on it; the first block's torch hooks read ``first``."""

    controller: Any
    output: bool = False  # output level: the root hook predicts the whole forward, the block hooks stand aside
    active: bool = False
    branch: str = DEFAULT_BRANCH
    key: Tuple = ()  # (thread, branch): output level, the key of the branch's last computed input
    skip: bool = False
    predict: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    mode: int = _PLAIN  # what every block hook does: _PLAIN (the plain block), _COMPUTE or _SKIP
    first: bool = False  # the first block's work (keep h_in, or predict) is still to do
    inline: bool = False  # the next block hook does it itself: the stack's first block was not called
    last_in: Optional[torch.Tensor] = None  # the stream entering the newest block hook
    last_encoder: Optional[torch.Tensor] = None  # on a skip: the text stream entering it
    h_in: Optional[torch.Tensor] = None
    h_out: Optional[torch.Tensor] = None

    def start(self, branch: str, predict) -> None:
        self.active, self.branch = True, branch
        self.skip, self.predict = predict is not None, predict
        self.mode = _PLAIN if self.output else _SKIP if self.skip else _COMPUTE
        self.first = self.inline = self.mode != _PLAIN
        self.h_in = self.h_out = self.last_in = self.last_encoder = None

    def clear(self) -> None:
        self.active = self.skip = self.first = self.inline = False
        self.mode = _PLAIN
        self.predict = self.h_in = self.h_out = self.last_in = self.last_encoder = None


@dataclass
class _Installed:
    module: torch.nn.Module
    created_registry: bool


_MAX_REPEAT = 3  # calls per step outside cache contexts told apart: cond, uncond, skip-layer guidance, one more


def _signature(x) -> Optional[Tuple]:
    """What a transformer input must keep for an output-level prediction to stand in for the call."""
    return (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else None


def _sample_of(module, output) -> torch.Tensor:
    """The tensor a transformer call returned: ``output.sample``, or ``output[0]`` of ``(sample,)``."""
    if isinstance(output, (tuple, list)) and len(output) == 1 and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if not isinstance(output, (tuple, list)) and isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(
        f"tcpade level='output' needs a transformer that returns one tensor ((sample,) or an output with .sample); "
        f"{type(module).__name__} returned {type(output).__name__}: use level='block' for it"
    )


def _time_of(controller, timestep) -> Optional[float]:
    """The call's time as a host float, read once per call: the controller's ``step_time``
    where it has one (the Runtime: from a host copy of the pipeline's schedule, no device
    read), else the timestep argument's first element."""
    step_time = getattr(controller, "step_time", None)
    if step_time is not None:
        return step_time(timestep)
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    return None if timestep is None else float(timestep)


class _RootHook(ModelHook):
    """On the transformer: the branch (diffusers' cache context), the decision before the
    forward and the controller's ``finish`` after it.

    The decision and ``finish`` run in torch forward pre-/post-hooks of the transformer,
    marked ``torch.compiler.disable``: dynamo runs the hooks of the module it compiles
    outside the graph, so ``torch.compile(transformer, fullgraph=True)`` traces the forward
    and the block hooks in one graph while the decision stays eager. This diffusers hook
    itself changes nothing in the forward; it is stateful, so that diffusers'
    ``cache_context`` sets the branch on its ``StateManager`` and ``reset_stateful_hooks``
    reaches the controller.
    """

    # The flag diffusers' hooks declare themselves stateful with (a private name, the only way:
    # ``cache_context`` and ``reset_stateful_hooks`` visit the hooks that set it).
    # tests/test_diffusers_internals.py fails by name if diffusers stops reading it.
    _is_stateful = True

    def __init__(self, state: _CallState, timestep_reader: _ArgReader, controls=(), inputs=None, return_dict=None):
        super().__init__()
        self.state_manager = _ThreadContext(_NoState)
        self.call = state
        self.lock = _CallLock()
        self.timestep = timestep_reader
        self.controls: List[_ArgReader] = list(controls)  # block-level control residuals: compute
        # Output level: the forward's hidden-states and return_dict arguments, the input each branch's
        # last computed call got (a skip needs the same), the output class a return_dict call returned.
        self.inputs, self.return_dict = inputs, return_dict
        self.seen: Dict[Tuple, Tuple] = {}  # by (thread, branch)
        self.output_cls: Any = Transformer2DModelOutput
        # Per thread: the timestep of the previous call outside a cache context (``last_time``) and
        # the calls in a row at that timestep (``repeat``).
        self._local = threading.local()
        self.installed: List[_Installed] = []
        self.handles: list = []

    def branch(self, t: Optional[float]) -> str:
        """The branch of a call at time ``t`` (a host float, or None when the call has none)."""
        try:
            return self.state_manager.context.name
        except ValueError:  # no cache context set
            pass
        # Pipelines that run CFG as two calls per step without cache contexts (FluxImg2Img,
        # FluxKontext, SD3's skip-layer guidance call): the n-th call at one timestep is branch
        # "default.n", so that each trajectory keeps its own history.
        loc = self._local
        loc.repeat = getattr(loc, "repeat", 0) + 1 if t is not None and t == getattr(loc, "last_time", None) else 0
        loc.last_time = t
        n = min(loc.repeat, _MAX_REPEAT)  # bounded: a constant-timestep loop does not add branches
        return DEFAULT_BRANCH if n == 0 else f"{DEFAULT_BRANCH}.{n + 1}"

    def forced(self, args: tuple, kwargs: dict) -> Optional[str]:
        """Why this call must be computed whatever the controller's policy says, read from the
        call's arguments: "control" when it carries block-level ControlNet residuals (a skip
        would drop them); None: the controller decides."""
        return "control" if any(c(args, kwargs) is not None for c in self.controls) else None

    @torch.compiler.disable
    def before(self, module, args, kwargs):
        self.lock.acquire(_call_frame(module))
        try:
            st = self.call
            st.clear()
            timestep = self.timestep(args, kwargs)
            t = _time_of(st.controller, timestep)
            branch = self.branch(t)
            force = self.forced(args, kwargs)
            predict = st.controller.decide(branch, timestep if t is None else t, force)
            if force is not None and predict is not None:
                raise RuntimeError(
                    f"a tcpade controller returned a prediction for a call forced to compute ({force!r})")
            st.start(branch, predict)
            st.key = (threading.get_ident(), branch)
        except BaseException:
            self.lock.release()
            raise

    def _input(self, args, kwargs) -> Optional[Tuple]:
        return _signature(self.inputs(args, kwargs)) if self.inputs is not None else None

    def new_forward(self, module, *args, **kwargs):
        """Output level: a skipped call returns the prediction of the transformer's output without
        running any of the forward (traced under a whole-model compile: flags and custom ops only).
        Block level, or a computed call: the forward as it is."""
        st = self.call
        if not (st.output and st.active):
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.skip:
            pred = st.predict(None) if self._input(args, kwargs) == self.seen.get(st.key) else None
            if pred is not None:
                if self.return_dict is not None and not self.return_dict(args, kwargs):
                    return (pred,)
                return self.output_cls(sample=pred)
            st.skip = False  # another input than the computed calls had: compute this call after all
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def after(self, module, args, kwargs, output):
        if self.lock.owner != threading.get_ident():
            # ``before`` raised and let the lock go (or never ran): the call state may already be
            # another thread's call.
            return
        st = self.call
        try:
            if output is not None:  # None: the forward raised (this hook is always called)
                if st.skip:
                    st.controller.finish(st.branch, None, None)
                elif st.output:
                    sample = _sample_of(module, output)
                    self.seen[st.key] = self._input(args, kwargs)
                    if not isinstance(output, (tuple, list)):
                        self.output_cls = type(output)
                    st.controller.finish(st.branch, None, sample)
                else:
                    st.controller.finish(st.branch, st.h_in, st.h_out)
        finally:
            st.clear()
            self.lock.release()

    def reset_state(self, module):
        self.state_manager.reset()
        self._local.last_time, self._local.repeat = None, 0
        reset = getattr(self.call.controller, "reset", None)
        if callable(reset):
            reset()
        return module


def _dense(t):
    # contiguous() keeps a slice whose leading size-1 dimension has another stride; dynamo
    # guards on that stride.
    return t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t


def _unview(x):
    if isinstance(x, torch.Tensor) and (x._base is not None or not x.is_contiguous()):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _contiguous(output):
    """A block's output with tensors of the standard strides (FLUX's single blocks return
    slices of one tensor, whose strides would make the next block compile once more)."""
    if isinstance(output, tuple):
        return tuple(_dense(t) for t in output)
    return _dense(output)


def _prediction(st: _CallState, h_in: torch.Tensor) -> Optional[torch.Tensor]:
    """The controller's prediction from ``h_in`` (None: compute the call after all), checked."""
    pred = st.predict(h_in)
    if pred is not None and (pred.shape != h_in.shape or pred.dtype != h_in.dtype or pred.device != h_in.device):
        raise ValueError(
            "a tcpade controller's prediction must be None or a tensor like h_in: got "
            f"{tuple(pred.shape)} {pred.dtype} {pred.device}, h_in is "
            f"{tuple(h_in.shape)} {h_in.dtype} {h_in.device}"
        )
    return pred


class _BlockHook(ModelHook):
    """On each block; traced inside a compiled block region, so it only reads the call state's
    flags, stores tensors on it and runs the controller's prediction (custom ops).

    The diffusers hook (``new_forward``) does the same on every block of a class: compute: the
    block runs, its input stream is kept as ``last_in`` and its image output as ``h_out`` (the
    last one stored is ``h_out``, also when SD3's ``skip_layers`` leaves the last block out);
    skip: no layer runs, the block returns its normal return structure with its own input
    stream as the image and its text stream passed through. What only the first block does
    is in two torch hooks on the stack's first block: the forward hook (``after_block``)
    keeps that block's ``last_in`` as ``h_in`` (compute) or replaces the image part of its
    output by the prediction from it (skip), which every later block passes on (with whatever
    the model concatenates to it between the lists); the pre-hook (``before_first``) tells the
    block hooks that the first block is running. When it is not called (SD3's ``skip_layers``
    naming block 0), the first block hook that runs does that work itself (``inline``).

    Why the split: diffusers runs every hooked module's forward through one shared code
    object (``HookRegistry``'s ``new_forward``), so under ``compile_repeated_blocks`` the
    compiled variants of all blocks of all classes count against dynamo's recompile limit (8)
    together. Kept uniform, a block class compiles one compute and one skip variant there per
    shape family (FLUX: 2 classes, 4 variants, and 4 more with dynamic shapes at the first new
    resolution); the first block's work compiles in the torch hooks' own code objects (frames
    of their own under a regional compile, inlined under a whole-model compile). The forward
    hook sees the block's output, which diffusers' context parallelism has already split (its
    split hooks sit inside the block's forward), like the stream kept in ``last_in``. Under
    torch.compile the streams also keep one layout from block to block (``before_first``,
    ``_contiguous``): dynamo guards on strides and, with dynamic shapes, on whether an input
    is a view. Eager runs get the same tensors as without that."""

    def __init__(self, state: _CallState, spec: BlockSpec, block: torch.nn.Module):
        super().__init__()
        self.call = state
        self.spec = spec
        fwd = type(block).forward
        self.read_hidden = _ArgReader(fwd, spec.hidden_arg)
        self.read_encoder = _ArgReader(fwd, spec.encoder_arg) if spec.encoder_arg else None
        # image_of needs h_in's token count only for a stream that is not the image tokens alone.
        self.own_tokens = spec.tokens == "all" and type(spec).image_of is BlockSpec.image_of

    def new_forward(self, module, *args, **kwargs):
        st = self.call
        mode = st.mode
        if mode == _PLAIN:  # outside a hooked transformer call, or at output level: the plain block
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.inline:
            return self._first_inline(module, args, kwargs)
        hidden = self.read_hidden(args, kwargs)
        st.last_in = hidden
        if mode == _SKIP:
            encoder = self.read_encoder(args, kwargs) if self.read_encoder is not None else None
            st.last_encoder = encoder
            return self.spec.assemble(module, encoder, hidden)
        return self._compute(module, args, kwargs, hidden)

    def _compute(self, module, args, kwargs, hidden):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if torch.compiler.is_compiling():
            output = _contiguous(output)
        # The first block's own input is h_in (its forward hook stores it after this).
        ref = hidden if self.own_tokens or self.call.h_in is None else self.call.h_in
        self.call.h_out = self.spec.image_of(module, output, ref)
        return output

    def _first_inline(self, module, args, kwargs):
        """The first block's work in the block hook: the stack's first block was not called."""
        st = self.call
        st.inline = st.first = False
        h_in = self.read_hidden(args, kwargs)
        if st.mode == _SKIP:
            pred = _prediction(st, h_in)
            if pred is not None:
                encoder = self.read_encoder(args, kwargs) if self.read_encoder is not None else None
                return self.spec.assemble(module, encoder, pred)
            st.skip, st.mode = False, _COMPUTE  # the controller cannot predict this h_in: compute after all
        st.h_in = h_in
        return self._compute(module, args, kwargs, h_in)

    def before_first(self, module, args, kwargs):
        """The torch forward pre-hook of the stack's first block. The block hooks are told that
        the first block runs (its forward hook does the first block's work). Under
        torch.compile its streams (the image and the text stream that flow from block to block)
        that are views or not contiguous (FLUX's embedders return views of a 2-d matmul, DiT's a
        transposed view) become contiguous tensors of their own, like the outputs of the
        compiled blocks that feed every later block: dynamo guards on the strides of a block's
        inputs and, once a new resolution makes it trace with dynamic shapes, on whether they
        are views, so the first block would compile every variant of its class once more."""
        st = self.call
        if not st.first:
            return None
        st.inline = False
        if not torch.compiler.is_compiling():
            return None
        for reader in (self.read_hidden, self.read_encoder):
            if reader is not None:
                args, kwargs = reader.replace(args, kwargs, _unview)
        return args, kwargs

    def after_block(self, module, args, kwargs, output):
        """The torch forward hook of the stack's first block: keep its input as ``h_in``
        (compute) or return its output with the prediction as the image part (skip)."""
        st = self.call
        if not st.first:
            return None
        st.first = False
        h_in, st.last_in = st.last_in, None
        if st.mode == _COMPUTE:
            st.h_in = h_in
            return None
        pred = _prediction(st, h_in)
        if pred is None:  # the controller cannot predict this h_in: compute the call after all
            st.skip, st.mode = False, _COMPUTE
            output = module.forward(*args, **kwargs)  # the block's hooks again, now computing
            st.h_in, st.last_in = st.last_in, None
            return output
        return self.spec.assemble(module, st.last_encoder, pred)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _root_hook(module: torch.nn.Module) -> Optional[_RootHook]:
    registry = _registry_of(module)
    return None if registry is None else registry.get_hook(ROOT_HOOK)


def is_attached(transformer) -> bool:
    """True if tcpade hooks are attached to this transformer."""
    module = _unwrap(transformer)
    if _root_hook(module) is not None:
        return True
    return any((r := _registry_of(m)) is not None and r.get_hook(BLOCK_HOOK) is not None for m in module.modules())


def _register(module: torch.nn.Module, hook: ModelHook, name: str, installed: List[_Installed]) -> None:
    created = _registry_of(module) is None
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    installed.append(_Installed(module, created))


def _unregister(entry: _Installed, name: str) -> None:
    module = entry.module
    registry = _registry_of(module)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    # No hook left: undo what HookRegistry left behind, so the module is as it was before attach.
    fwd = module.__dict__.get("forward")
    if getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(module).forward:
        del module.forward  # registry restored the bound method as an instance attribute
    if entry.created_registry:
        delattr(module, _REGISTRY_ATTR)


def attach(transformer, controller: Controller) -> None:
    """Register tcpade's hooks on ``transformer``; ``controller`` decides per call (see ``Controller``)."""
    module = _unwrap(transformer)
    adapter = find_adapter(module)
    if is_attached(module):
        raise RuntimeError(
            f"tcpade hooks are already attached to this {type(module).__name__}; call "
            "tcpade.integrations.adapters.detach() first"
        )
    if getattr(module, "_cache_config", None) is not None:
        raise RuntimeError(
            f"a diffusers cache ({type(module._cache_config).__name__}) is enabled on this "
            f"{type(module).__name__}; call transformer.disable_cache() before attaching tcpade"
        )
    # Validate everything before touching the model.
    blocks = adapter.stack(module)
    specs = [adapter.spec_for(b) for _, b in blocks]
    for name, block in blocks:
        registry = _registry_of(block)
        if registry is not None and any(isinstance(h, ContextParallelSplitHook) for h in registry.hooks.values()):
            # diffusers runs the hook registered last outermost: ours would see the unsplit sequence.
            raise RuntimeError(
                f"diffusers' context parallelism splits the inputs of {name}, a block tcpade hooks: call "
                "tcpade.apply before transformer.enable_parallelism"
            )
    level = getattr(controller, "level", "block")
    if level not in LEVELS:
        raise ValueError(f"a tcpade controller's level must be one of {LEVELS}, got {level!r}")
    if level == "output" and adapter.list_output:
        raise TypeError(f"tcpade level='output' cannot predict {type(module).__name__}'s output (a list of "
                        "tensors, one per image): use level='block'")  # fmt: skip
    fwd = type(module).forward
    names = _param_names(fwd)
    inputs = _ArgReader(fwd, "hidden_states" if "hidden_states" in names else names[0]) if names else None
    return_dict = _ArgReader(fwd, "return_dict") if "return_dict" in names else None
    state = _CallState(controller, output=level == "output")
    root = _RootHook(state, _ArgReader(fwd, adapter.timestep_arg), [_ArgReader(fwd, n) for n in adapter.control_args],
                     inputs, return_dict)  # fmt: skip
    hooks = [_BlockHook(state, spec, block) for (_, block), spec in zip(blocks, specs)]
    installed: List[_Installed] = []
    try:
        for (_, block), hook in zip(blocks, hooks):
            _register(block, hook, BLOCK_HOOK, installed)
        _register(module, root, ROOT_HOOK, installed)
    except BaseException:
        for entry, name in zip(installed, [BLOCK_HOOK] * len(blocks) + [ROOT_HOOK]):
            _unregister(entry, name)
        raise
    root.installed = installed
    root.handles = [
        module.register_forward_pre_hook(root.before, with_kwargs=True),
        module.register_forward_hook(root.after, with_kwargs=True, always_call=True),
        blocks[0][1].register_forward_pre_hook(hooks[0].before_first, with_kwargs=True),
        blocks[0][1].register_forward_hook(hooks[0].after_block, with_kwargs=True),
    ]
    # Hooks were added below the transformer: rebuild diffusers' cached list of child registries.
    _registry_of(module).invalidate_child_registries_cache()


def detach(transformer) -> None:
    """Remove every tcpade hook; the model then behaves as if it had never been hooked."""
    module = _unwrap(transformer)
    root = _root_hook(module)
    if root is not None:
        for handle in root.handles:
            handle.remove()
        entries = root.installed
        for entry in entries[:-1]:
            _unregister(entry, BLOCK_HOOK)
        _unregister(entries[-1], ROOT_HOOK)
    # Stray block hooks (e.g. an interrupted attach): remove them too.
    for m in module.modules():
        registry = _registry_of(m)
        if registry is not None and registry.get_hook(BLOCK_HOOK) is not None:
            _unregister(_Installed(m, created_registry=False), BLOCK_HOOK)
    registry = _registry_of(module)
    if registry is not None:
        registry.invalidate_child_registries_cache()


@contextlib.contextmanager
def cache_context(transformer, name: str, **kwargs) -> Iterator[None]:
    """``transformer.cache_context(name)`` for any transformer, also those without diffusers' CacheMixin
    (DiT, SD3 in diffusers 0.42.1): inside it, tcpade's controller and any other stateful diffusers
    hook on the model (a diffusers cache run in the same loop) see ``branch == name``.

    Without CacheMixin this calls what ``CacheMixin.cache_context`` itself calls, diffusers'
    private ``diffusers.hooks.hooks._set_cache_context`` (the context of every stateful hook under
    the module): diffusers has no public function for a model without the mixin, and setting the
    context of tcpade's own hook alone would leave a diffusers cache on the same model without
    one (tests/test_diffusers_internals.py names it when it changes)."""
    module = _unwrap(transformer)
    if hasattr(module, "cache_context"):
        with module.cache_context(name, **kwargs):
            yield
        return
    if _registry_of(module) is None:  # no diffusers hooks at all: nothing reads the context
        yield
        return
    from diffusers.hooks.hooks import _set_cache_context

    _set_cache_context(module, CacheContext(name, **kwargs))
    try:
        yield
    finally:
        _set_cache_context(module, None)
