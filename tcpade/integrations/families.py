"""The diffusers model families tcpade knows: which blocks form each transformer's stack.

Two tables, both keyed by class name:

* ``FAMILIES``: per transformer class, the ``nn.ModuleList`` attributes that form the block
  stack in the order its ``forward`` runs them, the name of its timestep argument, the
  arguments that carry block-level control residuals (ControlNet: a call that gets them is
  always computed, because a skipped call would drop them), the pipelines that drive it, how
  those pipelines run classifier-free guidance, and what the transformer does after the
  stack (read from its ``forward``; the self-check in ``tests/test_families.py`` proves it).
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

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["FAMILIES", "OWN_BLOCKS", "BlockSpec", "Family", "block_spec", "registry_block"]

# "separate": the pipeline calls the transformer once per CFG branch, inside
# ``transformer.cache_context("cond" / "uncond")``: one history per branch.
# "batched": one call with cond and uncond stacked on the batch (one history for both).
# "none": no classifier-free guidance (guidance distilled into the model, or not used).
SEPARATE, BATCHED, NONE = "separate", "batched", "none"


@dataclass(frozen=True)
class Family:
    """One transformer class: see the module docstring."""

    name: str
    stacks: Tuple[str, ...]
    pipelines: Tuple[str, ...] = ()
    cfg: str = SEPARATE
    timestep_arg: str = "timestep"
    control_args: Tuple[str, ...] = ()
    after_stack: str = ""
    list_output: bool = False  # forward returns one tensor per image (a list): level="output" cannot predict it


def _f(name, stacks, pipelines, cfg=SEPARATE, timestep_arg="timestep", control_args=(), after_stack="",
       list_output=False):  # fmt: skip
    return Family(name, tuple(stacks), tuple(pipelines), cfg, timestep_arg, tuple(control_args), after_stack,
                  list_output)  # fmt: skip


_DOUBLE_SINGLE = ("transformer_blocks", "single_transformer_blocks")

FAMILIES: Dict[str, Family] = {
    "FluxTransformer2DModel": _f(
        "flux", _DOUBLE_SINGLE,
        ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline",
         "FluxKontextInpaintPipeline", "FluxFillPipeline", "FluxControlNetPipeline"),
        control_args=("controlnet_block_samples", "controlnet_single_block_samples"),
        after_stack="norm_out(image, temb), proj_out; the text stream is dropped",
    ),
    "Flux2Transformer2DModel": _f(
        "flux2", _DOUBLE_SINGLE, ("Flux2Pipeline",), cfg=NONE,
        after_stack="between the lists: cat(text, image); after: the text part is sliced off, norm_out, proj_out",
    ),
    "QwenImageTransformer2DModel": _f(
        "qwenimage", ("transformer_blocks",),
        ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
         "QwenImageControlNetPipeline"),
        control_args=("controlnet_block_samples",),
        after_stack="norm_out(image, temb), proj_out",
    ),
    "WanTransformer3DModel": _f(
        "wan", ("blocks",), ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"),
        after_stack="norm_out, proj_out on the image tokens (the text is a cross-attention input)",
    ),
    "HunyuanVideoTransformer3DModel": _f(
        "hunyuanvideo", _DOUBLE_SINGLE, ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"), cfg=NONE,
        after_stack="norm_out(image, temb), proj_out; both lists take and return (image, text) separately",
    ),
    "HunyuanVideo15Transformer3DModel": _f(
        "hunyuanvideo15", ("transformer_blocks",),
        ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
        after_stack="norm_out(image, temb), proj_out",
    ),
    "HunyuanImageTransformer2DModel": _f(
        "hunyuanimage", _DOUBLE_SINGLE, ("HunyuanImagePipeline",),
        after_stack="norm_out(image, temb), proj_out",
    ),
    "LTXVideoTransformer3DModel": _f(
        "ltx", ("transformer_blocks",), ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
        cfg=BATCHED, after_stack="norm_out, scale/shift from the timestep embedding, proj_out",
    ),
    "ZImageTransformer2DModel": _f(
        "zimage", ("layers",), ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline"),
        cfg=BATCHED, timestep_arg="t", control_args=("controlnet_block_samples",),
        after_stack="the final layer on the joint (image, text) sequence, then unpatchify of the image part; "
        "noise_refiner and context_refiner run before the stack",
        list_output=True,
    ),
    "CogView4Transformer2DModel": _f(
        "cogview4", ("transformer_blocks",), ("CogView4Pipeline",),
        after_stack="norm_out(image, temb), proj_out",
    ),
    "CogVideoXTransformer3DModel": _f(
        "cogvideox", ("transformer_blocks",), ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline"),
        cfg=BATCHED, after_stack="norm_final on cat(text, image) (1.0) or image (1.5), then the image part; "
        "norm_out, proj_out",
    ),
    "MochiTransformer3DModel": _f(
        "mochi", ("transformer_blocks",), ("MochiPipeline",),
        after_stack="norm_out(image, temb), proj_out",
    ),
    # `skip_layers` (skip-layer guidance) makes the model not call some blocks: the decision is
    # taken in whichever hooked block runs first, and end() is called from the root hook if the
    # last block was one of the skipped ones. SD3Transformer2DModel has no CacheMixin: the
    # pipeline's batched call is branch "default", its skip-layer call at the same timestep
    # "default.2".
    "SD3Transformer2DModel": _f(
        "sd3", ("transformer_blocks",),
        ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
         "StableDiffusion3ControlNetPipeline"),
        cfg=BATCHED, control_args=("block_controlnet_hidden_states",),
        after_stack="norm_out(image, temb), proj_out",
    ),
    "PixArtTransformer2DModel": _f(
        "pixart", ("transformer_blocks",), ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), cfg=BATCHED,
        after_stack="norm_out, scale/shift from the embedded timestep, proj_out",
    ),
    "SanaTransformer2DModel": _f(
        "sana", ("transformer_blocks",), ("SanaPipeline", "SanaSprintPipeline", "SanaControlNetPipeline"),
        cfg=BATCHED, control_args=("controlnet_block_samples",),
        after_stack="norm_out(image, embedded timestep), proj_out",
    ),
    "ChromaTransformer2DModel": _f(
        "chroma", _DOUBLE_SINGLE, ("ChromaPipeline", "ChromaImg2ImgPipeline"),
        control_args=("controlnet_block_samples", "controlnet_single_block_samples"),
        after_stack="between the lists: cat(text, image); after: the text part is sliced off, norm_out, proj_out",
    ),
    "Lumina2Transformer2DModel": _f(
        "lumina2", ("layers",), ("Lumina2Pipeline",), cfg=SEPARATE,
        after_stack="norm_out on the joint (text, image) sequence, then unpatchify of the image part; "
        "context_refiner and noise_refiner run before the stack",
    ),
    "HiDreamImageTransformer2DModel": _f(
        "hidream", ("double_stream_blocks", "single_stream_blocks"), ("HiDreamImagePipeline",), cfg=BATCHED,
        timestep_arg="timesteps",
        after_stack="between the lists: cat(image, text); after: the image part, final_layer, unpatchify",
    ),
    "CosmosTransformer3DModel": _f(
        "cosmos", ("transformer_blocks",), ("CosmosTextToWorldPipeline", "Cosmos2TextToImagePipeline",
                                            "Cosmos2VideoToWorldPipeline"),
        control_args=("block_controlnet_hidden_states",),
        after_stack="norm_out(image, embedded timestep, temb), proj_out",
    ),
    # No CacheMixin: the branch is "default" unless tcpade.integrations.adapters.cache_context is used.
    "DiTTransformer2DModel": _f(
        "dit", ("transformer_blocks",), ("DiTPipeline",), cfg=BATCHED,
        after_stack="transformer_blocks[0].norm1.emb (a submodule, not the block's forward), norm_out, "
        "proj_out_1/2",
    ),
}


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
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # an older diffusers without the registry
        return None
    TransformerBlockRegistry._register()
    for base in cls.__mro__:
        meta = TransformerBlockRegistry._registry.get(base)
        if meta is None:
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
