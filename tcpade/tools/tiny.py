"""Tiny diffusers transformers and pipelines with random weights, built from configs: the one
home of the tiny models tcpade's tests and benchmarks run on.

Nothing is downloaded: every model here is constructed from its config in milliseconds
with a fixed seed, so two builds give the same weights. Trained models (meaningful
trajectories, quality numbers) are in :mod:`tcpade.zoo`. Two sets, with different configs
(each set's weights are what its tests and golden files were made with):

The reference four (FLUX, Wan, DiT, SD3; the golden decisions, the API, sampling, compile and
fault tests, ``bench/compile.py`` and ``bench/soak.py``):

* ``CONFIGS[family]``: the constructor arguments of the tiny FLUX, Wan, DiT and SD3
  transformers (odd, small sizes: 2-3 blocks, 12-32 channels); ``transformer(family)``;
* ``FAMILIES[family]()``: ``(transformer in eval mode, inputs(k) -> call kwargs, image
  shape)``, the image shape being that of ``h_in`` / ``h_out`` (the image tokens
  entering and leaving the block stack) for the batch of ``inputs``;
* ``PIPELINES[family]()``: ``(pipeline, generate(steps=4, ...) -> output)`` with prompt
  embeddings precomputed (no text encoder) and a one-level VAE; FLUX and Wan run
  classifier-free guidance as separate "cond" / "uncond" calls, DiT and SD3 batch it
  into one call.

Every supported family (the per-family tests, output-level caching, calibration on
transformers and pipelines, inductor compiles):

* ``TINY[name]()``: a :class:`Tiny`: a transformer from a config (1-2 layers, 8-16 wide, a few
  hundred tokens at most, seeded), ``inputs(k)``: the keyword arguments of a distinct call k
  (its own noise and timestep, CFG-free), and ``out(result)``: the tensor to compare from what
  the transformer returns;
* ``FAMILY_PIPELINES[name]()``: the family's real diffusers pipeline (and variants: img2img,
  inpainting, Kontext, ControlNet, Wan2.2's two experts) around a ``TINY`` transformer, text
  encoders None, precomputed prompt embeddings; returns ``(pipe, generate)``,
  ``generate(steps=..., **kw)`` running it to latents with a fixed generator.

And ``CompileCount``: what torch.compile did inside a ``with`` block (frames, graphs,
recompiles, graph breaks), for the compile tests and ``bench/compile.py``.

Needs diffusers (``pip install 'tcpade[diffusers]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = [
    "BATCH",
    "CONFIGS",
    "CompileCount",
    "FAMILIES",
    "FAMILY_PIPELINES",
    "PIPELINES",
    "TINY",
    "TXT",
    "Tiny",
    "flux_ids",
    "tiny_vae",
    "transformer",
]

BATCH, TXT = 2, 5  # batch of FAMILIES' inputs; text tokens everywhere

CONFIGS: Dict[str, dict] = {
    "flux": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "dit": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=16),
}  # fmt: skip

_CLASSES = {
    "flux": "FluxTransformer2DModel",
    "wan": "WanTransformer3DModel",
    "dit": "DiTTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
}


def transformer(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny ``family`` transformer (``CONFIGS`` updated by ``overrides``), weights drawn
    after ``torch.manual_seed(seed)``, in eval mode (in training mode DiT's class-label
    embedding drops labels at random)."""
    import diffusers

    if family not in CONFIGS:
        raise ValueError(f"unknown tiny model family {family!r}; available: {sorted(CONFIGS)}")
    torch.manual_seed(seed)
    return getattr(diffusers, _CLASSES[family])(**{**CONFIGS[family], **overrides}).eval()


def flux_ids(h: int, w: int) -> torch.Tensor:
    """FLUX's image position ids (h * w, 3) for an h x w token grid."""
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                     indexing="ij"), -1)  # fmt: skip
    return ids.reshape(h * w, 3).float()


def _flux():
    model = transformer("flux")
    h = w = 4
    n = h * w
    ids = flux_ids(h, w)

    def inputs(k):
        g = torch.Generator().manual_seed(100 + k)
        return dict(
            hidden_states=torch.randn(BATCH, n, 16, generator=g),
            encoder_hidden_states=torch.randn(BATCH, TXT, 32, generator=g),
            pooled_projections=torch.randn(BATCH, 32, generator=g),
            timestep=torch.full((BATCH,), 1.0 - 0.2 * k),
            img_ids=ids,
            txt_ids=torch.zeros(TXT, 3),
        )

    return model, inputs, (BATCH, n, 32)


def _wan():
    model = transformer("wan")

    def inputs(k):
        g = torch.Generator().manual_seed(200 + k)
        return dict(
            hidden_states=torch.randn(BATCH, 16, 2, 4, 4, generator=g),
            timestep=torch.full((BATCH,), 900 - 200 * k),
            encoder_hidden_states=torch.randn(BATCH, TXT, 32, generator=g),
        )

    return model, inputs, (BATCH, 2 * 2 * 2, 24)


def _dit():
    model = transformer("dit")

    def inputs(k):
        g = torch.Generator().manual_seed(300 + k)
        return dict(
            hidden_states=torch.randn(BATCH, 4, 8, 8, generator=g),
            timestep=torch.full((BATCH,), 900 - 200 * k, dtype=torch.long),
            class_labels=torch.tensor([1, 7]),
        )

    return model, inputs, (BATCH, 16, 16)


def _sd3():
    model = transformer("sd3")

    def inputs(k):
        g = torch.Generator().manual_seed(400 + k)
        return dict(
            hidden_states=torch.randn(BATCH, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(BATCH, TXT, 32, generator=g),
            pooled_projections=torch.randn(BATCH, 16, generator=g),
            timestep=torch.full((BATCH,), 900.0 - 200 * k),
        )

    return model, inputs, (BATCH, 16, 16)


FAMILIES: Dict[str, Callable[[], Tuple[torch.nn.Module, Callable[[int], dict], tuple]]] = {
    "flux": _flux,
    "wan": _wan,
    "dit": _dit,
    "sd3": _sd3,
}


def tiny_vae(sample_size: int):
    """A one-level AutoencoderKL with 4 latent channels (scale factor 1): pipelines need one."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=1, sample_size=sample_size)  # fmt: skip


def wan_pipeline():
    """A WanPipeline (2 blocks); ``generate(steps)``: 5 frames 32x32, guidance 5 (cond / uncond calls)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    model = transformer("wan", num_layers=2)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=model)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, TXT, 32, generator=g), torch.randn(1, TXT, 32, generator=g)

    def generate(steps=4):
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=32, width=32, num_frames=5,
                    num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames  # fmt: skip

    return pipe, generate


def flux_embeds(dtype=torch.float32):
    """``flux_pipeline``'s precomputed prompt embeddings: (prompt, pooled, negative, negative pooled)."""
    g = torch.Generator().manual_seed(1)
    pe, pp = torch.randn(1, TXT, 32, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)
    ne, npp = torch.randn(1, TXT, 32, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)
    return pe, pp, ne, npp


def flux_pipeline(dtype=torch.float32):
    """A FluxPipeline; ``generate(steps, size=16, images=1)``: true CFG 2 (cond / uncond calls)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = transformer("flux")  # first: the VAE's weights are drawn after the transformer's seed
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(32), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)  # fmt: skip
    if dtype != torch.float32:
        pipe.to(dtype)
    pe, pp, ne, npp = flux_embeds(dtype)

    def generate(steps=4, size=16, images=1):
        return pipe(num_images_per_prompt=images, prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                    negative_pooled_prompt_embeds=npp, true_cfg_scale=2.0, height=size, width=size,
                    num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, generate


def dit_pipeline():
    """A DiTPipeline with DDIM; ``generate(steps)``: classes [1, 7], guidance 4 batched in one call."""
    from diffusers import DDIMScheduler, DiTPipeline

    model = transformer("dit")
    pipe = DiTPipeline(transformer=model, vae=tiny_vae(8), scheduler=DDIMScheduler())

    def generate(steps=4):
        out = pipe(class_labels=[1, 7], guidance_scale=4.0, num_inference_steps=steps, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        return torch.from_numpy(out)

    return pipe, generate


def sd3_pipeline():
    """A StableDiffusion3Pipeline; ``generate(steps)``: 8x8, guidance 3 batched in one call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = transformer("sd3")
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(8), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    emb = [torch.randn(1, TXT, 32, generator=g), torch.randn(1, 16, generator=g)]
    neg = [torch.randn(1, TXT, 32, generator=g), torch.randn(1, 16, generator=g)]

    def generate(steps=4):
        return pipe(prompt_embeds=emb[0], pooled_prompt_embeds=emb[1], negative_prompt_embeds=neg[0],
                    negative_pooled_prompt_embeds=neg[1], height=8, width=8, num_inference_steps=steps,
                    guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    return pipe, generate


PIPELINES: Dict[str, Callable[[], tuple]] = {
    "flux": flux_pipeline,
    "wan": wan_pipeline,
    "dit": dit_pipeline,
    "sd3": sd3_pipeline,
}


# ------------------------------------------------------------------------ every supported family
# ``TINY`` and ``FAMILY_PIPELINES``: one tiny model per family tcpade supports (narrower than the
# four above: 8-16 channels, batch 1 but for SD3, PixArt, Sana and DiT, a VAE seeded on its own).


@dataclass
class Tiny:
    model: torch.nn.Module
    inputs: Callable[[int], dict]
    out: Callable = lambda r: r[0]  # noqa: E731
    timestep_scale: float = 1.0  # tcpade.sample's: 1e-3 where the model takes t / 1000


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rn(g, *shape):
    return torch.randn(*shape, generator=g)


def _ts(k, scale=1000.0, b=1):
    return torch.full((b,), scale * (0.9 - 0.2 * k))


def _eval(model):
    # eval(): a freshly built model is in training mode (dropout, label dropping in DiT).
    return model.eval()


def flux_transformer(num_layers=1, num_single_layers=1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return _eval(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ))  # fmt: skip


def flux():
    model = flux_transformer()
    n = 16

    def inputs(k):
        g = _g(100 + k)
        return dict(
            hidden_states=_rn(g, 1, n, 16), encoder_hidden_states=_rn(g, 1, TXT, 16),
            pooled_projections=_rn(g, 1, 16), timestep=_ts(k, 1.0), img_ids=flux_ids(4, 4), txt_ids=torch.zeros(TXT, 3),
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def flux2_transformer():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return _eval(Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ))  # fmt: skip


def flux2():
    model = flux2_transformer()

    def inputs(k):
        g = _g(110 + k)
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TXT))
        return dict(
            hidden_states=_rn(g, 1, 16, 16), encoder_hidden_states=_rn(g, 1, TXT, 16),
            img_ids=img_ids[None], txt_ids=txt_ids[None], timestep=_ts(k, 1.0), guidance=torch.ones(1),
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def qwenimage_transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return _eval(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ))  # fmt: skip


def qwenimage():
    model = qwenimage_transformer()

    def inputs(k):
        g = _g(120 + k)
        return dict(
            hidden_states=_rn(g, 1, 16, 16), encoder_hidden_states=_rn(g, 1, TXT, 16),
            encoder_hidden_states_mask=torch.ones(1, TXT, dtype=torch.long), timestep=_ts(k, 1.0),
            img_shapes=[(1, 4, 4)],
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def qwenimage_edit():
    """A Qwen-Image-Edit call: the reference image's latent tokens follow the noisy ones in
    ``hidden_states`` (img_shapes lists both grids); the pipeline keeps the first half of the
    output. (QwenImageEditPipeline itself resizes the reference to about 1024x1024 pixels before
    encoding it, whatever the output size: too big for these tests.)"""
    model = qwenimage_transformer()

    def inputs(k):
        g = _g(125 + k)
        return dict(
            hidden_states=torch.cat([_rn(g, 1, 16, 16), _rn(_g(9), 1, 16, 16)], 1),
            encoder_hidden_states=_rn(g, 1, TXT, 16), encoder_hidden_states_mask=torch.ones(1, TXT, dtype=torch.long),
            timestep=_ts(k, 1.0), img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def wan_transformer(num_layers=2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return _eval(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ))  # fmt: skip


def wan():
    model = wan_transformer()

    def inputs(k):
        g = _g(130 + k)
        return dict(hidden_states=_rn(g, 1, 16, 2, 8, 8), timestep=_ts(k), encoder_hidden_states=_rn(g, 1, TXT, 16))

    return Tiny(model, inputs)


def hunyuanvideo():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = _eval(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    ))  # fmt: skip

    def inputs(k):
        g = _g(140 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 2, 4, 4), timestep=_ts(k), encoder_hidden_states=_rn(g, 1, TXT, 16),
            encoder_attention_mask=torch.ones(1, TXT), pooled_projections=_rn(g, 1, 8),
            guidance=torch.full((1,), 6000.0),
        )  # fmt: skip

    return Tiny(model, inputs)


def hunyuanvideo15():
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = _eval(HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ))  # fmt: skip

    def inputs(k):
        g = _g(150 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 2, 4, 4), timestep=_ts(k), encoder_hidden_states=_rn(g, 1, TXT, 16),
            encoder_attention_mask=torch.ones(1, TXT), encoder_hidden_states_2=_rn(g, 1, 3, 8),
            encoder_attention_mask_2=torch.ones(1, 3), image_embeds=torch.zeros(1, 4, 12),
        )  # fmt: skip

    return Tiny(model, inputs)


def hunyuanimage():
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    model = _eval(HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4),
    ))  # fmt: skip

    def inputs(k):
        g = _g(160 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 4, 4), timestep=_ts(k), encoder_hidden_states=_rn(g, 1, TXT, 16),
            encoder_attention_mask=torch.ones(1, TXT),
        )  # fmt: skip

    return Tiny(model, inputs)


def ltx_transformer():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return _eval(LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    ))  # fmt: skip


def ltx():
    model = ltx_transformer()

    def inputs(k):
        g = _g(170 + k)
        return dict(
            hidden_states=_rn(g, 1, 2 * 4 * 4, 8), encoder_hidden_states=_rn(g, 1, TXT, 16), timestep=_ts(k),
            encoder_attention_mask=torch.ones(1, TXT), num_frames=2, height=4, width=4,
        )  # fmt: skip

    return Tiny(model, inputs)


def zimage_transformer():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return _eval(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=2, n_refiner_layers=1,
        n_heads=1, n_kv_heads=1, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 16, 16],
    ))  # fmt: skip


def zimage():
    model = zimage_transformer()

    def inputs(k):
        g = _g(180 + k)
        return dict(x=[_rn(g, 16, 1, 8, 8)], cap_feats=[_rn(g, 7, 16)], t=torch.full((1,), 0.9 - 0.2 * k))

    return Tiny(model, inputs, out=lambda r: torch.stack(r[0]))


def cogview4_transformer():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    return _eval(CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(4, 4),
    ))  # fmt: skip


def cogview4():
    model = cogview4_transformer()

    def inputs(k):
        g = _g(190 + k)
        size = torch.tensor([[64.0, 64.0]])
        return dict(
            hidden_states=_rn(g, 1, 4, 8, 8), encoder_hidden_states=_rn(g, 1, 8, 16), timestep=_ts(k),
            original_size=size, target_size=size, crop_coords=torch.zeros(1, 2),
        )  # fmt: skip

    return Tiny(model, inputs)


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = _eval(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TXT,
    ))  # fmt: skip

    def inputs(k):
        g = _g(200 + k)
        return dict(hidden_states=_rn(g, 1, 2, 4, 8, 8), encoder_hidden_states=_rn(g, 1, TXT, 16), timestep=_ts(k))

    return Tiny(model, inputs)


def mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = _eval(MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16,
    ))  # fmt: skip

    def inputs(k):
        g = _g(210 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 2, 8, 8), encoder_hidden_states=_rn(g, 1, TXT, 16), timestep=_ts(k),
            encoder_attention_mask=torch.ones(1, TXT, dtype=torch.bool),
        )  # fmt: skip

    return Tiny(model, inputs)


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return _eval(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ))  # fmt: skip


def sd3():
    model = sd3_transformer()

    def inputs(k):
        g = _g(220 + k)
        return dict(
            hidden_states=_rn(g, 2, 4, 8, 8), encoder_hidden_states=_rn(g, 2, TXT, 16),
            pooled_projections=_rn(g, 2, 16), timestep=_ts(k, b=2),
        )  # fmt: skip

    return Tiny(model, inputs)


def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = _eval(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, use_additional_conditions=False,
    ))  # fmt: skip

    def inputs(k):
        g = _g(230 + k)
        return dict(
            hidden_states=_rn(g, 2, 4, 8, 8), encoder_hidden_states=_rn(g, 2, TXT, 16), timestep=_ts(k, b=2),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )  # fmt: skip

    return Tiny(model, inputs)


def sana_transformer():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return _eval(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=2,
    ))  # fmt: skip


def sana():
    model = sana_transformer()

    def inputs(k):
        g = _g(240 + k)
        return dict(hidden_states=_rn(g, 2, 4, 8, 8), encoder_hidden_states=_rn(g, 2, TXT, 16), timestep=_ts(k, b=2))

    return Tiny(model, inputs)


def chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    model = _eval(ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1,
    ))  # fmt: skip

    def inputs(k):
        g = _g(250 + k)
        return dict(
            hidden_states=_rn(g, 1, 16, 16), encoder_hidden_states=_rn(g, 1, TXT, 16), timestep=_ts(k, 1.0),
            img_ids=flux_ids(4, 4), txt_ids=torch.zeros(TXT, 3),
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = _eval(Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 4, 4), axes_lens=(64, 16, 16),
        cap_feat_dim=16,
    ))  # fmt: skip

    def inputs(k):
        g = _g(260 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 8, 8), timestep=_ts(k, 1.0), encoder_hidden_states=_rn(g, 1, TXT, 16),
            encoder_attention_mask=torch.ones(1, TXT, dtype=torch.bool),
        )  # fmt: skip

    return Tiny(model, inputs, timestep_scale=1e-3)


def hidream_transformer():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return _eval(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
    ))  # fmt: skip


def hidream():
    model = hidream_transformer()

    def inputs(k):
        g = _g(270 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 8, 8), timesteps=_ts(k), encoder_hidden_states_t5=_rn(g, 1, TXT, 16),
            encoder_hidden_states_llama3=_rn(g, 2, 1, TXT, 8), pooled_embeds=_rn(g, 1, 16),
        )  # fmt: skip

    return Tiny(model, inputs)


def cosmos():
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    model = _eval(CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    ))  # fmt: skip

    def inputs(k):
        g = _g(280 + k)
        return dict(
            hidden_states=_rn(g, 1, 4, 2, 8, 8), timestep=_ts(k), encoder_hidden_states=_rn(g, 1, TXT, 16),
            fps=30,
        )  # fmt: skip

    return Tiny(model, inputs)


def dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = _eval(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ))  # fmt: skip

    def inputs(k):
        g = _g(290 + k)
        return dict(
            hidden_states=_rn(g, 2, 4, 8, 8), timestep=torch.full((2,), 900 - 200 * k, dtype=torch.long),
            class_labels=torch.tensor([1, 7]),
        )  # fmt: skip

    return Tiny(model, inputs)


TINY: Dict[str, Callable[[], Tiny]] = {
    "flux": flux, "flux2": flux2, "qwenimage": qwenimage, "qwenimage-edit": qwenimage_edit, "wan": wan,
    "hunyuanvideo": hunyuanvideo, "hunyuanvideo15": hunyuanvideo15, "hunyuanimage": hunyuanimage, "ltx": ltx,
    "zimage": zimage,
    "cogview4": cogview4, "cogvideox": cogvideox, "mochi": mochi, "sd3": sd3, "pixart": pixart, "sana": sana,
    "chroma": chroma, "lumina2": lumina2, "hidream": hidream, "cosmos": cosmos, "dit": dit,
}  # fmt: skip


def family_vae(latent_channels=4):
    """A one-level AutoencoderKL (scale factor 1): the pipelines need one to encode and for sizes."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=1,
        sample_size=8, shift_factor=0.0, scaling_factor=1.0,
    )  # fmt: skip


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _embeds(seed, *shapes):
    g = _g(seed)
    return [_rn(g, *s) for s in shapes]


def _image(size, seed=7):
    return torch.rand(1, 3, size, size, generator=_g(seed))


def _latent_gen():
    return torch.Generator().manual_seed(0)


def flux_family_pipeline(cls_name="FluxPipeline", layers=(1, 1), **components):
    """FLUX.1 with true CFG (negative embeddings, true_cfg_scale 2): cond / uncond calls. The
    variants take the same components; img2img / inpainting take an image (and a mask).
    ``layers``: the transformer's double and single block counts; ``generate(size=...)``: a
    side, or (height, width). The VAE's scale factor is 1: size 16 gives a 16 x 16 latent, 64
    image tokens, as FLUX's own VAE gives at 128 x 128."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = getattr(diffusers, cls_name)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=family_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=flux_transformer(*layers), **components,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pe, pp, ne, npp = _embeds(1, (1, TXT, 16), (1, 16), (1, TXT, 16), (1, 16))

    def generate(steps=20, size=8, true_cfg_scale=2.0, **kw):
        height, width = (size, size) if isinstance(size, int) else size
        return pipe(
            prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp,
            true_cfg_scale=true_cfg_scale, height=height, width=width, num_inference_steps=steps,
            output_type="latent", generator=_latent_gen(), **kw,
        ).images  # fmt: skip

    return pipe, generate


def flux_img2img_pipeline():
    pipe, generate = flux_family_pipeline("FluxImg2ImgPipeline")
    return pipe, lambda steps=20, strength=0.6, **kw: generate(steps, image=_image(8), strength=strength, **kw)


def flux_inpaint_pipeline():
    pipe, generate = flux_family_pipeline("FluxInpaintPipeline")
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    return pipe, lambda steps=20, strength=0.6, **kw: generate(
        steps, image=_image(8), mask_image=mask, strength=strength, **kw
    )


def flux_kontext_pipeline():
    """FLUX.1 Kontext: the reference image's latent tokens ride along with the noisy ones (the
    reference image given as latents: a (1, 4, 8, 8) tensor is not encoded again)."""
    pipe, generate = flux_family_pipeline("FluxKontextPipeline")
    ref = _rn(_g(8), 1, 4, 8, 8)
    return pipe, lambda steps=20, **kw: generate(steps, image=ref, _auto_resize=False, max_area=64, **kw)


def flux_controlnet_pipeline():
    """FluxControlNetPipeline with a tiny FluxControlNetModel: every call of the transformer gets
    controlnet_block_samples / controlnet_single_block_samples."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(1)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    pipe, generate = flux_family_pipeline("FluxControlNetPipeline", controlnet=controlnet)
    return pipe, lambda steps=20, **kw: generate(steps, control_image=_image(8, seed=12),
                                                 controlnet_conditioning_scale=1.0, **kw)  # fmt: skip


def sd3_family_pipeline(cls_name="StableDiffusion3Pipeline"):
    """SD3: CFG batched into one call (guidance_scale 3)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = getattr(diffusers, cls_name)(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=family_vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pe, pp, ne, npp = _embeds(2, (1, TXT, 16), (1, 16), (1, TXT, 16), (1, 16))

    def generate(steps=20, size=8, **kw):
        return pipe(
            prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp,
            guidance_scale=3.0, height=size, width=size, num_inference_steps=steps, output_type="latent",
            generator=_latent_gen(), **kw,
        ).images  # fmt: skip

    return pipe, generate


def sd3_img2img_pipeline():
    pipe, generate = sd3_family_pipeline("StableDiffusion3Img2ImgPipeline")
    return pipe, lambda steps=20, strength=0.6, **kw: generate(steps, image=_image(8), strength=strength, **kw)


def wan_family_pipeline(two_experts=False):
    """Wan2.1 (one transformer) or Wan2.2 (``transformer`` for the high-noise steps,
    ``transformer_2`` for the rest, boundary_ratio 0.5), CFG as cond / uncond calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer_2 = None
    if two_experts:
        transformer_2 = wan_transformer()
        with torch.no_grad():  # a different expert: not the same weights
            for p in transformer_2.parameters():
                p.mul_(0.9)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0 if two_experts else 5.0),
        transformer=wan_transformer(), transformer_2=transformer_2, boundary_ratio=0.5 if two_experts else None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds(3, (1, TXT, 16), (1, TXT, 16))

    def generate(steps=20, size=16, **kw):
        return pipe(
            prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size, num_frames=5,
            num_inference_steps=steps, guidance_scale=5.0, output_type="latent", generator=_latent_gen(), **kw,
        ).frames  # fmt: skip

    return pipe, generate


def tiny_qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip


def qwenimage_pipeline(cls_name="QwenImagePipeline", **components):
    """Qwen-Image with true CFG (true_cfg_scale 4 with negative embeddings): cond / uncond calls."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = getattr(diffusers, cls_name)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_qwen_vae(), text_encoder=None, tokenizer=None,
        transformer=qwenimage_transformer(), **components,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds(4, (1, TXT, 16), (1, TXT, 16))
    mask = torch.ones(1, TXT, dtype=torch.long)

    def generate(steps=20, size=16, **kw):
        return pipe(
            prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=ne, negative_prompt_embeds_mask=mask,
            true_cfg_scale=4.0, height=size, width=size, num_inference_steps=steps, output_type="latent",
            generator=_latent_gen(), **kw,
        ).images  # fmt: skip

    return pipe, generate


def zimage_pipeline():
    """Z-Image: CFG batched into one call (guidance_scale 4), the prompt embeddings as lists."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=family_vae(latent_channels=16), text_encoder=None,
        tokenizer=None, transformer=zimage_transformer(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds(5, (7, 16), (6, 16))

    def generate(steps=20, size=8, **kw):
        return pipe(
            prompt_embeds=[pe], negative_prompt_embeds=[ne], guidance_scale=4.0, height=size, width=size,
            num_inference_steps=steps, output_type="latent", generator=_latent_gen(), **kw,
        ).images  # fmt: skip

    return pipe, generate


def hidream_pipeline():
    """HiDream-I1: CFG batched into one call (guidance_scale 5), precomputed T5 / Llama / pooled
    embeddings. The pipeline scales every request to default_sample_size**2 pixels: 8x8 here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=family_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, text_encoder_4=None,
        tokenizer_4=None, transformer=hidream_transformer(),
    )  # fmt: skip
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    t5, llama, pooled, nt5, nllama, npooled = _embeds(6, (1, TXT, 16), (2, 1, TXT, 8), (1, 16), (1, TXT, 16),
                                                      (2, 1, TXT, 8), (1, 16))  # fmt: skip

    def generate(steps=20, **kw):
        return pipe(
            prompt_embeds_t5=t5, prompt_embeds_llama3=llama, pooled_prompt_embeds=pooled,
            negative_prompt_embeds_t5=nt5, negative_prompt_embeds_llama3=nllama,
            negative_pooled_prompt_embeds=npooled, guidance_scale=5.0, height=8, width=8, num_inference_steps=steps,
            output_type="latent", generator=_latent_gen(), **kw,
        ).images  # fmt: skip

    return pipe, generate


FAMILY_PIPELINES: Dict[str, Callable] = {
    "flux": flux_family_pipeline, "flux-img2img": flux_img2img_pipeline, "flux-inpaint": flux_inpaint_pipeline,
    "flux-kontext": flux_kontext_pipeline, "flux-controlnet": flux_controlnet_pipeline, "sd3": sd3_family_pipeline,
    "sd3-img2img": sd3_img2img_pipeline, "wan": wan_family_pipeline,
    "wan22": lambda: wan_family_pipeline(two_experts=True), "qwenimage": qwenimage_pipeline,
    "zimage": zimage_pipeline, "hidream": hidream_pipeline,
}  # fmt: skip


class CompileCount:
    """Inside a block: frames dynamo compiled (its ``frames`` counter, which fullgraph
    compiles leave at 0), graphs it built, recompiles it logged, graph breaks."""

    def __enter__(self):
        import logging

        from torch._dynamo.utils import counters

        counters.clear()
        self._counters = counters
        self.recompiles = []
        torch._logging.set_logs(recompiles=True)
        self._log = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._handler = logging.Handler()
        self._handler.emit = lambda rec: self.recompiles.append(rec.getMessage())
        self._log.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        self._log.removeHandler(self._handler)
        torch._logging.set_logs()
        counters = self._counters
        self.frames = counters["frames"]["total"]
        self.graphs = counters["stats"]["unique_graphs"]
        self.graph_breaks = sum(counters["graph_break"].values())
