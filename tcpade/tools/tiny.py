"""Tiny diffusers transformers and pipelines with random weights, built from configs.

Nothing is downloaded: every model here is constructed from its config in milliseconds
with a fixed seed, so two builds give the same weights. tcpade's tests and
``bench/compile.py`` run on them; trained models
(meaningful trajectories, quality numbers) are in :mod:`tcpade.zoo`.

* ``CONFIGS[family]``: the constructor arguments of the tiny FLUX, Wan, DiT and SD3
  transformers (odd, small sizes: 2-3 blocks, 12-32 channels);
* ``FAMILIES[family]()``: ``(transformer in eval mode, inputs(k) -> call kwargs, image
  shape)``, the image shape being that of ``h_in`` / ``h_out`` (the image tokens
  entering and leaving the block stack) for the batch of ``inputs``;
* ``PIPELINES[family]()``: ``(pipeline, generate(steps=4, ...) -> output)`` with prompt
  embeddings precomputed (no text encoder) and a one-level VAE; FLUX and Wan run
  classifier-free guidance as separate "cond" / "uncond" calls, DiT and SD3 batch it
  into one call.
* ``CompileCount``: what torch.compile did inside a ``with`` block (frames, graphs,
  recompiles, graph breaks), for the compile tests and ``bench/compile.py``.

Needs diffusers (``pip install 'tcpade[diffusers]'``).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

__all__ = ["BATCH", "CONFIGS", "CompileCount", "FAMILIES", "PIPELINES", "TXT", "flux_ids", "tiny_vae", "transformer"]

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


def flux_pipeline(dtype=torch.float32):
    """A FluxPipeline; ``generate(steps, size=16, images=1)``: true CFG 2 (cond / uncond calls)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = transformer("flux")  # first: the VAE's weights are drawn after the transformer's seed
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(32), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)  # fmt: skip
    if dtype != torch.float32:
        pipe.to(dtype)
    g = torch.Generator().manual_seed(1)
    pe, pp = torch.randn(1, TXT, 32, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)
    ne, npp = torch.randn(1, TXT, 32, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)

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
