"""The diffusers model families tcpade knows: which blocks form each transformer's stack.

Two tables, both keyed by class name:

* ``FAMILIES``: per transformer class, a ``Family``: the ``nn.ModuleList`` attributes that
  form the block stack in the order its ``forward`` runs them, the name of its timestep
  argument, the arguments that carry block-level control residuals (ControlNet: a call that
  gets them is always computed, because a skipped call would drop them) and whether it
  returns a list. A comment at each entry says what the transformer does after the stack
  (read from its ``forward``; the self-check in ``tests/test_families.py`` proves it); the
  pipelines that drive each class and their classifier-free guidance forms are in
  ``docs/models.md``. ``Family.stack`` lists a model's blocks, ``Family.spec_for`` checks one.
* the block specs: where a block's image stream is among its inputs and outputs. They come
  from diffusers' own metadata, ``diffusers.hooks._helpers.TransformerBlockRegistry`` (the
  table diffusers' FirstBlockCache uses), for every registered block class; ``OWN_BLOCKS``
  holds what that registry lacks or gets wrong for tcpade's use.

A transformer class that is not in ``FAMILIES`` is not supported (``find_adapter`` raises a
``TypeError``), even when its blocks are registered: the stack is the chain of blocks whose
residual tcpade predicts, and only the transformer's ``forward`` says which lists form it
(Z-Image and Lumina2 also run refiner lists of the same block class before the main stack,
on the image and text tokens separately).

"Stream" below is the tensor the blocks pass on from one to the next. For most families it
holds the image tokens only; for Z-Image and Lumina2 it is the joint sequence of image and
text tokens (then the text tokens are predicted with the image tokens); FLUX.2's, Chroma's
and HiDream's single-stream blocks pass the concatenation of text and image tokens (then
``h_out`` is the image part of it, and on a skipped call the concatenation built from the
predicted image passes through them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["FAMILIES", "OWN_BLOCKS", "BlockSpec", "Family", "block_spec", "param_names", "registry_block"]


@dataclass(frozen=True)
class BlockSpec:
    """Where one block class's stream is among its inputs and outputs.

    hidden_arg: the ``forward`` parameter holding the stream (for the first block: ``h_in``).
    encoder_arg: the parameter holding the text stream that passes through on a skip (None: none).
    image_index: None if the block returns the stream as a tensor; else its index in the
        returned tuple, with the text stream at ``encoder_index``.
    tokens: "all" (the stream is the image tokens, or a joint sequence predicted whole), "first"
        or "last" (the block's stream is a concatenation whose image part is the first / last n
        tokens, n = the token count of ``h_in``).
    context_pre_only: a block built with ``context_pre_only=True`` returns None as its text stream.
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: Optional[str] = None
    image_index: Optional[int] = None
    encoder_index: Optional[int] = None
    tokens: str = "all"
    context_pre_only: bool = False

    def stream_of(self, block, output) -> torch.Tensor:
        """The stream in a block's output."""
        return output if self.image_index is None else output[self.image_index]

    def image_of(self, block, output, h_in: torch.Tensor) -> torch.Tensor:
        """The image tokens of a block's output (the tokens ``h_in`` holds)."""
        stream = self.stream_of(block, output)
        n = h_in.shape[1]
        if self.tokens == "all" or stream.shape[1] == n:
            return stream
        return stream[:, :n] if self.tokens == "first" else stream[:, stream.shape[1] - n :]

    def assemble(self, block, encoder, stream):
        """The block's return structure with ``stream`` as its stream and the input text stream
        ``encoder`` passed through."""
        if self.image_index is None:
            return stream
        out: List[Any] = [None, None]
        out[self.image_index] = stream
        if not (self.context_pre_only and getattr(block, "context_pre_only", False)):
            out[self.encoder_index] = encoder
        return tuple(out)


@dataclass(frozen=True)
class _HiDreamBlockSpec(BlockSpec):
    # HiDreamBlock wraps a double-stream block (returns (image, text)) or a single-stream one
    # (takes and returns cat(image, text) as one tensor).
    def _single(self, block) -> bool:
        return type(getattr(block, "block", None)).__name__ == "HiDreamImageSingleTransformerBlock"

    def stream_of(self, block, output):
        return output if self._single(block) else output[0]

    def assemble(self, block, encoder, stream):
        return stream if self._single(block) else (stream, encoder)


def _tuple(image_index, encoder_index, **kw):
    return BlockSpec("hidden_states", "encoder_hidden_states", image_index, encoder_index, **kw)


# What diffusers' TransformerBlockRegistry lacks (classes it does not register) or what differs
# for tcpade's use of a registered class.
OWN_BLOCKS: Dict[str, BlockSpec] = {
    # Registered, but the block's parameter is `x`, not `hidden_states`.
    "ZImageTransformerBlock": BlockSpec("x"),
    # Registered as returning a tensor; its stream is cat(text, image) (see FAMILIES).
    "Flux2SingleTransformerBlock": BlockSpec(tokens="last"),
    # Registered (1, 0); SD3's last block is built with context_pre_only and returns (None, image).
    "JointTransformerBlock": _tuple(1, 0, context_pre_only=True),
    "HunyuanVideo15TransformerBlock": _tuple(0, 1),
    "ChromaTransformerBlock": _tuple(1, 0),
    "ChromaSingleTransformerBlock": BlockSpec(tokens="last"),
    "SanaTransformerBlock": BlockSpec(),
    "Lumina2TransformerBlock": BlockSpec(),
    "CosmosTransformerBlock": BlockSpec(),
    # One class for both HiDream lists: it wraps a double-stream block (returns (image, text))
    # or a single-stream one (cat(image, text) in and out): _HiDreamBlockSpec.
    "HiDreamBlock": _HiDreamBlockSpec("hidden_states", "encoder_hidden_states", 0, 1, tokens="first"),
}


def registry_block(cls) -> Optional[BlockSpec]:
    """The BlockSpec diffusers' TransformerBlockRegistry gives for block class ``cls`` (or a base
    class of it), or None if it is not registered."""
    # diffusers exports the registry from a private module only (diffusers.hooks._helpers, the
    # table its FirstBlockCache uses); its public ``get`` raises ValueError for an unregistered
    # class. tests/test_diffusers_internals.py fails by name if either changes.
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # an older diffusers without the registry
        return None
    for base in cls.__mro__:
        try:
            meta = TransformerBlockRegistry.get(base)
        except ValueError:  # not registered
            continue
        if meta.return_encoder_hidden_states_index is None:
            # Registered with no text output: the block returns the image stream as a tensor.
            return BlockSpec(meta.hidden_states_argument_name)
        return BlockSpec(
            meta.hidden_states_argument_name,
            meta.encoder_hidden_states_argument_name,
            meta.return_hidden_states_index,
            meta.return_encoder_hidden_states_index,
        )
    return None


def block_spec(block) -> Optional[BlockSpec]:
    """The spec of a block module: ``OWN_BLOCKS`` first, then diffusers' registry; None if unknown."""
    for base in type(block).__mro__:
        if base.__name__ in OWN_BLOCKS:
            return OWN_BLOCKS[base.__name__]
    return registry_block(type(block))


def param_names(fn) -> List[str]:
    """The parameter names of a ``forward`` (without ``self``)."""
    names = list(inspect.signature(fn).parameters.keys())
    return names[1:] if names and names[0] == "self" else names


@dataclass(frozen=True)
class Family:
    """One transformer class tcpade hooks: where its block stack is and how its calls are read.

    name: the family's short name (in error messages and tests).
    stacks: the ``nn.ModuleList`` attributes that form the block stack, in the order the
        transformer's ``forward`` runs them.
    timestep_arg: the ``forward`` parameter holding the timestep.
    control_args: the ``forward`` parameters that carry block-level control residuals; a call
        that gets any of them is computed (reason "control").
    list_output: the ``forward`` returns one tensor per image (a list): ``level="output"``
        cannot predict it, ``attach`` refuses it.
    """

    name: str
    stacks: Tuple[str, ...]
    timestep_arg: str = "timestep"
    control_args: Tuple[str, ...] = ()
    list_output: bool = False

    def __post_init__(self):
        if not self.stacks or not all(isinstance(s, str) and s for s in self.stacks):
            raise ValueError(f"tcpade family {self.name!r}: stacks must be a non-empty tuple of attribute names, "
                             f"got {self.stacks!r}")  # fmt: skip

    def spec_for(self, block: torch.nn.Module) -> BlockSpec:
        """The spec of one block of the stack (``block_spec``), checked against its ``forward``."""
        spec = block_spec(block)
        if spec is None:
            raise TypeError(
                f"tcpade family {self.name!r}: block class {type(block).__name__} is neither in diffusers' "
                "TransformerBlockRegistry nor in tcpade.integrations.families.OWN_BLOCKS; the installed diffusers "
                "does not match this family (see the recipe in tcpade/integrations/adapters.py's docstring)."
            )
        names = param_names(type(block).forward)
        for arg in (spec.hidden_arg, spec.encoder_arg):
            if arg is not None and arg not in names:
                raise TypeError(
                    f"tcpade family {self.name!r}: {type(block).__name__}.forward has no parameter {arg!r} "
                    f"(its parameters: {names}); the installed diffusers does not match this family"
                )
        return spec

    def stack(self, transformer: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
        """The blocks of the stack, in the order they run, with their qualified names."""
        out = []
        for list_name in self.stacks:
            blocks = getattr(transformer, list_name, None)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise TypeError(
                    f"tcpade family {self.name!r}: {type(transformer).__name__}.{list_name} is not a ModuleList"
                )
            out.extend((f"{list_name}.{i}", b) for i, b in enumerate(blocks))
        if not out:
            raise TypeError(f"tcpade family {self.name!r}: {type(transformer).__name__} has no transformer blocks")
        return out


_DOUBLE_SINGLE = ("transformer_blocks", "single_transformer_blocks")
FAMILIES: Dict[str, Family] = {
    # After the stack: norm_out(image, temb), proj_out; the text stream is dropped.
    "FluxTransformer2DModel": Family(
        "flux", _DOUBLE_SINGLE, control_args=("controlnet_block_samples", "controlnet_single_block_samples")
    ),
    # Between the lists: cat(text, image); after: the text part is sliced off, norm_out, proj_out.
    "Flux2Transformer2DModel": Family("flux2", _DOUBLE_SINGLE),
    # After: norm_out(image, temb), proj_out.
    "QwenImageTransformer2DModel": Family(
        "qwenimage", ("transformer_blocks",), control_args=("controlnet_block_samples",)
    ),
    # After: norm_out, proj_out on the image tokens (the text is a cross-attention input).
    "WanTransformer3DModel": Family("wan", ("blocks",)),
    # After: norm_out(image, temb), proj_out; both lists take and return (image, text) separately.
    "HunyuanVideoTransformer3DModel": Family("hunyuanvideo", _DOUBLE_SINGLE),
    # After: norm_out(image, temb), proj_out.
    "HunyuanVideo15Transformer3DModel": Family("hunyuanvideo15", ("transformer_blocks",)),
    # After: norm_out(image, temb), proj_out.
    "HunyuanImageTransformer2DModel": Family("hunyuanimage", _DOUBLE_SINGLE),
    # After: norm_out, scale/shift from the timestep embedding, proj_out.
    "LTXVideoTransformer3DModel": Family("ltx", ("transformer_blocks",)),
    # noise_refiner and context_refiner run before the stack; after it: the final layer on the joint
    # (image, text) sequence, then unpatchify of the image part, one tensor per image.
    "ZImageTransformer2DModel": Family(
        "zimage", ("layers",), timestep_arg="t", control_args=("controlnet_block_samples",), list_output=True
    ),
    # After: norm_out(image, temb), proj_out.
    "CogView4Transformer2DModel": Family("cogview4", ("transformer_blocks",)),
    # After: norm_final on cat(text, image) (1.0) or image (1.5), then the image part; norm_out, proj_out.
    "CogVideoXTransformer3DModel": Family("cogvideox", ("transformer_blocks",)),
    # After: norm_out(image, temb), proj_out.
    "MochiTransformer3DModel": Family("mochi", ("transformer_blocks",)),
    # After: norm_out(image, temb), proj_out.
    # `skip_layers` (skip-layer guidance) makes the model not call some blocks: the decision is
    # taken in whichever hooked block runs first, and end() is called from the root hook if the
    # last block was one of the skipped ones. SD3Transformer2DModel has no CacheMixin: the
    # pipeline's batched call is branch "default", its skip-layer call at the same timestep
    # "default.2".
    "SD3Transformer2DModel": Family("sd3", ("transformer_blocks",), control_args=("block_controlnet_hidden_states",)),
    # After: norm_out, scale/shift from the embedded timestep, proj_out.
    "PixArtTransformer2DModel": Family("pixart", ("transformer_blocks",)),
    # After: norm_out(image, embedded timestep), proj_out.
    "SanaTransformer2DModel": Family("sana", ("transformer_blocks",), control_args=("controlnet_block_samples",)),
    # Between the lists: cat(text, image); after: the text part is sliced off, norm_out, proj_out.
    "ChromaTransformer2DModel": Family(
        "chroma", _DOUBLE_SINGLE, control_args=("controlnet_block_samples", "controlnet_single_block_samples")
    ),
    # context_refiner and noise_refiner run before the stack; after it: norm_out on the joint
    # (text, image) sequence, then unpatchify of the image part.
    "Lumina2Transformer2DModel": Family("lumina2", ("layers",)),
    # Between the lists: cat(image, text); after: the image part, final_layer, unpatchify.
    "HiDreamImageTransformer2DModel": Family(
        "hidream", ("double_stream_blocks", "single_stream_blocks"), timestep_arg="timesteps"
    ),
    # After: norm_out(image, embedded timestep, temb), proj_out.
    "CosmosTransformer3DModel": Family(
        "cosmos", ("transformer_blocks",), control_args=("block_controlnet_hidden_states",)
    ),
    # No CacheMixin: the branch is "default" unless tcpade.integrations.adapters.cache_context is used.
    # After: transformer_blocks[0].norm1.emb (a submodule, not the block's forward), norm_out, proj_out_1/2.
    "DiTTransformer2DModel": Family("dit", ("transformer_blocks",)),
}
