"""Attach a TC-Padé controller to an unchanged diffusers transformer, through diffusers' own hooks.

What is cached (docs/method.md section 1): per transformer call, ``h_in`` = the image-token hidden states
entering the FIRST transformer block, and ``h_out`` = the image-token hidden states leaving the
LAST transformer block (before ``norm_out`` / ``proj_out``). On a skipped call no transformer
block runs; the embeddings before the stack and the output norm / projection after it run
as usual, because they are outside the block stack.

Design (modelled on ``diffusers/hooks/first_block_cache.py``): nothing replaces a module's
``forward``; the hooks are ``diffusers.hooks.ModelHook``s in the modules' ``HookRegistry`` plus
two torch hooks on the transformer:

* before the transformer's forward (a torch forward pre-hook, eager even when the transformer is
  compiled whole): the branch is read (the name of the active cache context, ``"default"`` when
  none is set) with the ``timestep`` argument, and ``controller.decide(branch, timestep, force)``
  settles the call: None (compute) or a prediction callable (skip). The ``tcpade_root``
  ModelHook on the transformer is stateful, so ``transformer.cache_context(name)`` reaches its
  ``StateManager`` and a pipeline's hook reset reaches the controller.
* ``tcpade_block`` on every block of the stack. Traceable: it reads the decision as a plain
  Python flag and runs only tensor and custom ops, so a compiled block region
  (``compile_repeated_blocks(fullgraph=True)``) has no graph break and two variants:
  - compute: every block runs its original forward; the first block's input is kept as
    ``h_in``, each block's image output as ``h_out``;
  - skip: the first block calls the prediction on its ``h_in``; no block's forward runs; each
    block hook returns that block's normal return structure built from its inputs (text tokens
    pass through) with the image part set to the prediction, so whatever the model does
    between blocks, the stack leaves with the predicted ``h_out``.
* after the forward (a torch forward hook, eager): ``controller.finish(branch, h_in, h_out)``
  (None, None for a skipped call) stores the residual and keeps the books.

Text tokens are never predicted: on a skipped call the text stream leaving the stack is just the
text stream that entered it. That is harmless for every supported model, because what follows the
stack uses image tokens only (checked per model in the adapter comments below).

Recipe: adding a model family
-----------------------------
Write an ``Adapter`` and put it in ``SUPPORTED`` under the transformer's class name:

1. ``stacks``: the names of the ``nn.ModuleList`` attributes that form the block stack, in the
   order the transformer's ``forward`` runs them (FLUX: ``("transformer_blocks",
   "single_transformer_blocks")``). Everything between the first block's input and the last
   block's output is skipped.
2. ``blocks``: for each block class found in those lists, a ``BlockSpec`` saying where the image
   tokens are in the block's inputs (``hidden_arg``, a parameter name of the block's ``forward``;
   it must be the image-token states that the previous block produced, which for the first
   block is ``h_in``), which input is the text stream that passes through on a skip
   (``encoder_arg``), and what the block returns: a tensor (``image_index=None``) or a tuple
   with the image at ``image_index`` and the text stream at ``encoder_index``. Subclass
   ``BlockSpec`` and override ``assemble`` if a block returns something else (see
   ``_SD3BlockSpec``: a ``context_pre_only`` block returns ``(None, hidden_states)``).
3. ``timestep_arg``: the name of the transformer ``forward``'s timestep parameter.
4. Read the transformer's ``forward`` after the loop: check that ``norm_out``/``proj_out`` use the
   image tokens only (else text tokens would have to be predicted too) and that nothing after
   the loop calls a block's ``forward`` (calling a block's submodule, like DiT's
   ``transformer_blocks[0].norm1.emb``, is fine: hooks sit on the block, not on its children).

``attach`` checks the block classes against the adapter and raises ``TypeError`` when they
do not match, so a diffusers release that changes a block's signature fails loudly.

Limits: inference only (under gradient checkpointing a backward recompute of a skipped block
would run its real forward); ControlNet residuals that the transformer adds between blocks are
lost on a skipped call except the one added after the last block (``_RootHook.forced`` is where
a call that carries them is forced to compute); compile the transformer only
after ``attach`` (a graph traced before it does not contain the hooks).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

__all__ = [
    "Adapter",
    "BlockSpec",
    "Controller",
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

        Return None to run the blocks normally, or a callable to skip every block: the first
        block that runs calls it with ``h_in`` and it returns the predicted image ``h_out``
        (same shape/dtype/device as ``h_in``), or None to compute this call after all. It runs
        inside the compiled block region when the blocks are compiled: tensor and custom ops
        only. ``force``: a reason this call must be computed (e.g. "controlnet"), or None.
        """
        ...

    def finish(self, branch: str, h_in: Optional[torch.Tensor], h_out: Optional[torch.Tensor]) -> None:
        """Called once per transformer call, after its forward (eager). A computed call passes the
        image tokens entering the first block and leaving the last (``h_out`` goes on into
        ``norm_out``: read or copy them, never modify them in place); a skipped call passes None, None.
        """
        ...

    # Optional: ``reset()``. If the controller has it, it is called when diffusers resets the stateful
    # hooks of the transformer (``pipeline.maybe_free_model_hooks()`` at the end of every pipeline call,
    # for transformers with ``CacheMixin``), i.e. when a generation ends.


# --------------------------------------------------------------------------------------------------
# Adapters: which modules form the stack, where h_in and h_out live.
# --------------------------------------------------------------------------------------------------


def _param_names(fn) -> List[str]:
    names = list(inspect.signature(fn).parameters.keys())
    return names[1:] if names and names[0] == "self" else names


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


@dataclass(frozen=True)
class BlockSpec:
    """Where the image tokens are in one block class's inputs and outputs.

    hidden_arg: parameter of the block's ``forward`` holding the image-token states.
    encoder_arg: parameter holding the text stream that passes through on a skip (None: none).
    image_index: None if the block returns a tensor (the image states); else the index of the
        image states in the returned tuple.
    encoder_index: index of the text stream in the returned tuple.
    tuple_len: length of the returned tuple.
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: Optional[str] = None
    image_index: Optional[int] = None
    encoder_index: Optional[int] = None
    tuple_len: int = 2

    def image_of(self, output) -> torch.Tensor:
        return output if self.image_index is None else output[self.image_index]

    def assemble(self, block: torch.nn.Module, encoder: Optional[torch.Tensor], image: torch.Tensor):
        """The block's normal return structure, with ``image`` as the image states and the input text
        stream ``encoder`` passed through."""
        if self.image_index is None:
            return image
        out: List[Any] = [None] * self.tuple_len
        out[self.image_index] = image
        if self.encoder_index is not None:
            out[self.encoder_index] = encoder
        return tuple(out)


@dataclass(frozen=True)
class _SD3BlockSpec(BlockSpec):
    def assemble(self, block, encoder, image):
        # JointTransformerBlock returns (encoder_hidden_states, hidden_states); a block built with
        # context_pre_only=True (SD3's last block) returns (None, hidden_states).
        return (None if getattr(block, "context_pre_only", False) else encoder, image)


@dataclass(frozen=True)
class Adapter:
    """How tcpade finds h_in and h_out in one transformer family. See the module docstring."""

    name: str
    stacks: Tuple[str, ...]
    blocks: Dict[str, BlockSpec]  # block class name -> spec
    timestep_arg: str = "timestep"
    notes: str = ""

    def spec_for(self, block: torch.nn.Module) -> BlockSpec:
        for cls in type(block).__mro__:
            if cls.__name__ in self.blocks:
                return self.blocks[cls.__name__]
        raise TypeError(
            f"tcpade adapter {self.name!r}: block class {type(block).__name__} is not one of "
            f"{sorted(self.blocks)}; the installed diffusers does not match this adapter "
            "(see the recipe in tcpade/adapters.py's docstring)."
        )

    def stack(self, transformer: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
        out = []
        for list_name in self.stacks:
            blocks = getattr(transformer, list_name, None)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise TypeError(
                    f"tcpade adapter {self.name!r}: {type(transformer).__name__}.{list_name} is not a ModuleList"
                )
            out.extend((f"{list_name}.{i}", b) for i, b in enumerate(blocks))
        if not out:
            raise TypeError(f"tcpade adapter {self.name!r}: {type(transformer).__name__} has no transformer blocks")
        return out


# FLUX (transformer_flux.py, diffusers 0.42.1). h_in = x_embedder(hidden_states), the first
# FluxTransformerBlock's `hidden_states`. Both block kinds take (hidden_states, encoder_hidden_states,
# temb, image_rotary_emb, joint_attention_kwargs) and BOTH return (encoder_hidden_states, hidden_states):
# the single-stream block concatenates text+image inside and splits them again before returning
# (older diffusers passed the concatenation between single blocks; attach() would reject those).
# After the loop: norm_out(hidden_states, temb) and proj_out use the image tokens only; the text
# stream is dropped. On a skipped call the ControlNet residuals added between blocks are lost
# except the one added after the last single block.
_FLUX_BLOCK = BlockSpec("hidden_states", "encoder_hidden_states", image_index=1, encoder_index=0)

# Wan (transformer_wan.py). h_in = patch_embedding(x).flatten(2).transpose(1, 2), the first
# WanTransformerBlock's `hidden_states` (blocks are called positionally: hidden_states,
# encoder_hidden_states, temb, rotary_emb). Blocks return the image tensor; the text is a
# cross-attention input that no block changes. After the loop: norm_out/proj_out on image tokens.
_WAN_BLOCK = BlockSpec("hidden_states")

# DiT (dit_transformer_2d.py). h_in = pos_embed(x), the first BasicTransformerBlock's
# `hidden_states`; blocks return a tensor. There are no text tokens (class labels enter through
# adaLN). After the loop the model calls transformer_blocks[0].norm1.emb(...) (a SUBMODULE of the
# first block, not its forward, so it runs on a skipped call), then norm_out, proj_out_1/2 on the
# image tokens. DiTTransformer2DModel has no CacheMixin: the branch is "default" unless tcpade's
# `cache_context` helper below is used.
_DIT_BLOCK = BlockSpec("hidden_states")

# SD3 (transformer_sd3.py). h_in = pos_embed(x).contiguous(), the first JointTransformerBlock's
# `hidden_states`. Blocks return (encoder_hidden_states, hidden_states); the last block is built
# with context_pre_only=True and returns (None, hidden_states). After the loop norm_out/proj_out use
# the image tokens only. `skip_layers` (skip-layer guidance) makes the model not call some blocks:
# h_in is read by whichever hooked block runs first, h_out is the output of the last one that ran
# (also when the last block is one of the skipped layers). SD3Transformer2DModel has no CacheMixin
# in diffusers 0.42.1, so StableDiffusion3Pipeline calls run as "default" (it batches cond+uncond).
_SD3_BLOCK = _SD3BlockSpec("hidden_states", "encoder_hidden_states", image_index=1, encoder_index=0)

SUPPORTED: Dict[str, Adapter] = {
    "FluxTransformer2DModel": Adapter(
        "flux",
        ("transformer_blocks", "single_transformer_blocks"),
        {"FluxTransformerBlock": _FLUX_BLOCK, "FluxSingleTransformerBlock": _FLUX_BLOCK},
    ),
    "WanTransformer3DModel": Adapter("wan", ("blocks",), {"WanTransformerBlock": _WAN_BLOCK}),
    "DiTTransformer2DModel": Adapter("dit", ("transformer_blocks",), {"BasicTransformerBlock": _DIT_BLOCK}),
    "SD3Transformer2DModel": Adapter("sd3", ("transformer_blocks",), {"JointTransformerBlock": _SD3_BLOCK}),
}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile'd module -> the module it wraps


def find_adapter(transformer) -> Adapter:
    """The adapter for this transformer's class (or a base class of it)."""
    cls = type(_unwrap(transformer))
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED:
            return SUPPORTED[base.__name__]
    raise TypeError(
        f"tcpade has no adapter for {cls.__name__}. Supported transformers: {', '.join(sorted(SUPPORTED))}. "
        "To add a model family, follow the adapter recipe in the docstring of tcpade/adapters.py "
        "and register it in tcpade.adapters.SUPPORTED."
    )


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


class _NoState(BaseState):
    # The per-branch state lives in the controller; the StateManager only carries the context name.
    def reset(self, *args, **kwargs) -> None:
        pass


@dataclass
class _CallState:
    """The transformer call in flight, shared by the root hook and the block hooks. The block
    hooks read it as plain Python values (dynamo guards on ``active`` / ``skip``, so a compiled
    block region has two variants: compute and skip) and store tensors on it."""

    controller: Any
    active: bool = False
    branch: str = DEFAULT_BRANCH
    skip: bool = False
    predict: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    pred: Optional[torch.Tensor] = None
    h_in: Optional[torch.Tensor] = None
    h_out: Optional[torch.Tensor] = None

    def start(self, branch: str, predict) -> None:
        self.active, self.branch = True, branch
        self.skip, self.predict = predict is not None, predict
        self.pred = self.h_in = self.h_out = None

    def clear(self) -> None:
        self.active = self.skip = False
        self.predict = self.pred = self.h_in = self.h_out = None


@dataclass
class _Installed:
    module: torch.nn.Module
    created_registry: bool


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

    _is_stateful = True

    def __init__(self, state: _CallState, timestep_reader: _ArgReader):
        super().__init__()
        self.state_manager = StateManager(_NoState)
        self.call = state
        self.timestep = timestep_reader
        self.installed: List[_Installed] = []
        self.handles: list = []

    def branch(self) -> str:
        try:
            return self.state_manager.context.name
        except ValueError:  # no cache context set
            return DEFAULT_BRANCH

    def forced(self, args: tuple, kwargs: dict) -> Optional[str]:
        """Why this call must be computed whatever the controller's policy says (a reason
        string), read from the call's arguments; None: the controller decides."""
        return None

    @torch.compiler.disable
    def before(self, module, args, kwargs):
        st = self.call
        st.clear()
        branch = self.branch()
        st.start(branch, st.controller.decide(branch, self.timestep(args, kwargs), self.forced(args, kwargs)))

    @torch.compiler.disable
    def after(self, module, args, kwargs, output):
        st = self.call
        try:
            if output is not None:  # None: the forward raised (this hook is always called)
                if st.skip:
                    st.controller.finish(st.branch, None, None)
                else:
                    st.controller.finish(st.branch, st.h_in, st.h_out)
        finally:
            st.clear()

    def reset_state(self, module):
        self.state_manager.reset()
        reset = getattr(self.call.controller, "reset", None)
        if callable(reset):
            reset()
        return module


class _BlockHook(ModelHook):
    """On each block; traced inside a compiled block region, so it only reads the call state's
    flags, stores tensors on it and runs the controller's prediction (custom ops).

    Compute: the first block that runs stores its ``h_in``, every block its image output
    (the last one stored is ``h_out``, also when SD3's ``skip_layers`` leaves the last block
    out). Skip: the first block that runs predicts ``h_out`` from its ``h_in``; every block
    returns its normal return structure with that prediction as the image and the text
    stream passed through, running none of its layers."""

    def __init__(self, state: _CallState, spec: BlockSpec, block: torch.nn.Module):
        super().__init__()
        self.call = state
        self.spec = spec
        fwd = type(block).forward
        self.read_hidden = _ArgReader(fwd, spec.hidden_arg)
        self.read_encoder = _ArgReader(fwd, spec.encoder_arg) if spec.encoder_arg else None

    def new_forward(self, module, *args, **kwargs):
        st = self.call
        if not st.active:  # called outside a hooked transformer call: behave as the plain block
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.skip and st.pred is None:
            h_in = self.read_hidden(args, kwargs)
            pred = st.predict(h_in)
            if pred is None:  # the controller cannot predict this h_in: compute the call after all
                st.skip = False
            elif pred.shape != h_in.shape or pred.dtype != h_in.dtype or pred.device != h_in.device:
                raise ValueError(
                    "a tcpade controller's prediction must be None or a tensor like h_in: got "
                    f"{tuple(pred.shape)} {pred.dtype} {pred.device}, h_in is "
                    f"{tuple(h_in.shape)} {h_in.dtype} {h_in.device}"
                )
            else:
                st.pred = pred
        if st.skip:
            encoder = self.read_encoder(args, kwargs) if self.read_encoder is not None else None
            return self.spec.assemble(module, encoder, st.pred)
        if st.h_in is None:
            st.h_in = self.read_hidden(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        st.h_out = self.spec.image_of(output)
        return output


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _root_hook(module: torch.nn.Module) -> Optional[_RootHook]:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(ROOT_HOOK)


def is_attached(transformer) -> bool:
    """True if tcpade hooks are attached to this transformer."""
    module = _unwrap(transformer)
    if _root_hook(module) is not None:
        return True
    return any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(BLOCK_HOOK) is not None
        for m in module.modules()
    )


def _register(module: torch.nn.Module, hook: ModelHook, name: str, installed: List[_Installed]) -> None:
    created = not hasattr(module, "_diffusers_hook")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    installed.append(_Installed(module, created))


def _unregister(entry: _Installed, name: str) -> None:
    module = entry.module
    registry = getattr(module, "_diffusers_hook", None)
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
        del module._diffusers_hook


def attach(transformer, controller: Controller) -> None:
    """Register tcpade's hooks on ``transformer``; ``controller`` decides per call (see ``Controller``)."""
    module = _unwrap(transformer)
    adapter = find_adapter(module)
    if is_attached(module):
        raise RuntimeError(
            f"tcpade hooks are already attached to this {type(module).__name__}; call tcpade.adapters.detach() first"
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
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and any(h.startswith("cp_input---") for h in registry.hooks):
            # diffusers runs the hook registered last outermost: ours would see the unsplit sequence.
            raise RuntimeError(
                f"diffusers' context parallelism splits the inputs of {name}, a block tcpade hooks: call "
                "tcpade.apply before transformer.enable_parallelism"
            )
    state = _CallState(controller)
    root = _RootHook(state, _ArgReader(type(module).forward, adapter.timestep_arg))
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
    ]
    # Hooks were added below the transformer: rebuild diffusers' cached list of child registries.
    module._diffusers_hook.invalidate_child_registries_cache()


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
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(BLOCK_HOOK) is not None:
            _unregister(_Installed(m, created_registry=False), BLOCK_HOOK)
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


@contextlib.contextmanager
def cache_context(transformer, name: str, **kwargs) -> Iterator[None]:
    """``transformer.cache_context(name)`` for any transformer, also those without diffusers' CacheMixin
    (DiT, SD3 in diffusers 0.42.1): inside it, the controller sees ``branch == name``."""
    module = _unwrap(transformer)
    if hasattr(module, "cache_context"):
        with module.cache_context(name, **kwargs):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(module, CacheContext(name, **kwargs))
    try:
        yield
    finally:
        _set_cache_context(module, None)
