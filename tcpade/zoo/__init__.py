"""A model zoo of small but really trained diffusion transformers of the paper's families.

Nobody can download FLUX, Wan or DiT weights on our machines, and random weights give
meaningless trajectories, so tcpade ships six small models trained on CPU (``bench/train.py``)
on data that ships inside PyPI packages or is rendered in code; the quality benchmark and
``tcpade demo`` run on them. The first three are grey, with little detail (flux-digits,
without CFG, is the easiest for a cache); the last three are RGB 24x24 with detail at every
scale, 12-16 classes, 48 values per token and CFG 4-5 as two calls, closer to where a large
model's cache error is (docs/zoo.md has the numbers).

=============  ===============================  =============================================
name           diffusers class, objective       data, conditioning, sampling
=============  ===============================  =============================================
flux-digits    FluxTransformer2DModel,          digits 16x16 (packed 4x4: 16 tokens); class
               rectified flow (v-prediction)    -> 4 "prompt" tokens (encoder_hidden_states)
                                                + pooled vector; Euler flow matching, no
                                                CFG (as FLUX.1-dev)
dit-faces      DiTTransformer2DModel,           LFW subset 24x24 (patch 4: 36 tokens), face
               DDPM epsilon-prediction          / non-face as class_labels; DDIM with CFG
wan-digits     WanTransformer3DModel,           moving-digit clips 6x16x16 (patch 1x4x4: 96
               rectified flow (v-prediction)    tokens); class -> 4 prompt tokens; Euler
                                                flow matching with CFG
flux-shapes    FluxTransformer2DModel,          procedural RGB scenes 24x24 (packed 4x4: 36
               rectified flow (v-prediction)    tokens of 48): 4 shapes x 4 colours = 16
                                                classes on textured backgrounds; class -> 4
                                                prompt tokens + pooled; Euler, CFG 4 (two calls)
dit-photos     DiTTransformer2DModel,           RGB 24x24 patches of 12 scikit-image photos and
               DDPM epsilon-prediction          textures (patch 4: 36 tokens), class = image;
                                                DDIM with CFG 4
flux-photos    FluxTransformer2DModel (3 + 6    the same photo patches (packed 4x4: 36 tokens
               blocks), rectified flow          of 48); class -> 4 prompt tokens + pooled;
                                                Euler, shift 3, CFG 5 (two calls)
=============  ===============================  =============================================

    from tcpade import zoo
    m = zoo.load("flux-digits")
    images = m.sample(seeds=[0, 1], labels=[3, 7], steps=20)             # full computation
    images = m.sample(seeds=[0, 1], labels=[3, 7], steps=20, config=tcpade.TCPadeConfig.fast())
    # images: (2, 1, 16, 16) in [-1, 1]

The weights are float16 safetensors in ``tcpade/zoo/weights`` (loaded as float32), each
with a model card ``<name>.md`` (data, steps, loss, training time, command). Their calibrated
schedules (``tcpade.calibrate``, bench/calibration.py) ship in ``schedules.json``; the budget
presets (``TCPadeConfig.budget``) use them on these models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["SPECS", "ZooModel", "build", "load", "names", "weights_path"]

_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")


@dataclass(frozen=True)
class Spec:
    name: str
    family: str  # flux / dit / wan
    data: str
    num_classes: int
    sample_shape: tuple  # one sample in image space: (C, H, W) or (C, F, H, W)
    guidance_scale: float  # classifier-free guidance at sampling (1: none)
    objective: str  # "flow" (v = noise - x0) or "eps" (DDPM)
    shift: float = 1.0  # flow-matching timestep shift
    config: dict = field(default_factory=dict)  # the transformer's constructor arguments
    text_tokens: int = 4
    text_dim: int = 32
    pack: int = 1  # FLUX packs pack x pack pixels into one token


# The RGB FLUX models: 24x24x3 packed 4x4 into 36 tokens of 48 values, width 96 (3 heads of 32).
_FLUX_RGB = dict(patch_size=1, in_channels=48, attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64,
                 pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))  # fmt: skip

SPECS = {
    "flux-digits": Spec(
        "flux-digits", "flux", "digits", 10, (1, 16, 16), 1.0, "flow", shift=1.0,
        config=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=24,
                    num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                    axes_dims_rope=(8, 8, 8)),
        pack=4,
    ),
    "dit-faces": Spec(
        "dit-faces", "dit", "faces", 2, (1, 24, 24), 3.0, "eps",
        config=dict(num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1, num_layers=6,
                    sample_size=24, patch_size=4, num_embeds_ada_norm=2),
    ),
    "wan-digits": Spec(
        "wan-digits", "wan", "moving_digits", 10, (1, 6, 16, 16), 4.0, "flow", shift=3.0,
        config=dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=24, in_channels=1,
                    out_channels=1, text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
    ),
    # the harder two: RGB 24x24 with detail at every scale, 12-16 classes, width 96, CFG 4
    "flux-shapes": Spec(
        "flux-shapes", "flux", "shapes", 16, (3, 24, 24), 5.0, "flow", shift=3.0,
        config=dict(_FLUX_RGB, num_layers=2, num_single_layers=4), text_dim=64, pack=4,
    ),
    "dit-photos": Spec(
        "dit-photos", "dit", "photos", 12, (3, 24, 24), 4.0, "eps",
        config=dict(num_attention_heads=3, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=6,
                    sample_size=24, patch_size=4, num_embeds_ada_norm=12),
    ),
    # FLUX on the photo patches, with 3 + 6 blocks: the FLUX model below ~35 dB at 2.5x
    "flux-photos": Spec(
        "flux-photos", "flux", "photos", 12, (3, 24, 24), 5.0, "flow", shift=3.0,
        config=dict(_FLUX_RGB, num_layers=3, num_single_layers=6), text_dim=64, pack=4,
    ),
}  # fmt: skip


def names():
    return list(SPECS)


def weights_path(name: str) -> str:
    return os.path.join(_WEIGHTS, f"{name}.safetensors")


class ClassPrompt(nn.Module):
    """The "text encoder" of a class-conditional model: a learned table of prompt tokens per
    class (and a pooled vector for FLUX); row ``num_classes`` is the empty prompt (CFG's uncond)."""

    def __init__(self, num_classes: int, tokens: int, dim: int, pooled: bool):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.table = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.table.weight, std=1.0)
        self.pooled = nn.Embedding(num_classes + 1, dim) if pooled else None

    def forward(self, labels: torch.Tensor) -> dict:
        out = {"encoder_hidden_states": self.table(labels).view(len(labels), self.tokens, self.dim)}
        if self.pooled is not None:
            out["pooled_projections"] = self.pooled(labels)
        return out


def _flux_ids(h: int, w: int, tokens: int):
    img = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1
    ).reshape(h * w, 3)
    return img, torch.zeros(tokens, 3)


class ZooModel(nn.Module):
    """A transformer of the zoo, its class-prompt table and its sampling conventions."""

    def __init__(self, spec: Spec):
        super().__init__()
        from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, WanTransformer3DModel

        self.spec = spec
        cls = {"flux": FluxTransformer2DModel, "dit": DiTTransformer2DModel, "wan": WanTransformer3DModel}
        self.transformer = cls[spec.family](**spec.config)
        if spec.family == "dit":
            # diffusers' DiT drops labels independently in every block's own label table while
            # training; the trainer drops them once for the whole model instead (standard CFG training).
            for m in self.transformer.modules():
                if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                    m.dropout_prob = 0.0
            self.prompt = None
        else:
            self.prompt = ClassPrompt(spec.num_classes, spec.text_tokens, spec.text_dim, spec.family == "flux")

    # -- layout ---------------------------------------------------------------------------
    def to_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, *sample_shape) -> the transformer's input layout (FLUX: packed 2x2 tokens)."""
        if self.spec.family != "flux":
            return x
        b, c, h, w = x.shape
        p = self.spec.pack
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        if self.spec.family != "flux":
            return z
        c, h, w = self.spec.sample_shape
        b, p = z.shape[0], self.spec.pack
        return z.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise in the transformer's layout, one fixed draw per seed."""
        x = torch.stack(
            [torch.randn(self.spec.sample_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        return self.to_latents(x)

    def conditions(self, labels: torch.Tensor) -> dict:
        """Transformer keyword arguments for these labels (``num_classes`` = the empty prompt)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if self.spec.family == "dit":
            return {"class_labels": labels}
        kw = self.prompt(labels)
        if self.spec.family == "flux":
            _, h, w = self.spec.sample_shape
            img_ids, txt_ids = _flux_ids(h // self.spec.pack, w // self.spec.pack, self.spec.text_tokens)
            kw.update(img_ids=img_ids, txt_ids=txt_ids)
        return kw

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One model call in training conventions: t in [0, 1] (flow) or integer DDPM steps (eps)."""
        kw = self.conditions(labels)
        if self.spec.family == "flux":
            t = t.to(z.dtype)  # FLUX takes sigma in [0, 1] and multiplies by 1000 itself
        elif self.spec.objective == "flow":
            t = t * 1000.0
        return self.transformer(hidden_states=z, timestep=t, return_dict=False, **kw)[0]

    # -- sampling -------------------------------------------------------------------------
    def noise_scheduler(self):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        if self.spec.objective == "flow":
            return FlowMatchEulerDiscreteScheduler(shift=self.spec.shift)
        return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], labels: Sequence[int], steps: int = 20, config=None,
               guidance_scale: Optional[float] = None, return_summary: bool = False):  # fmt: skip
        """Images (B, *sample_shape) in [-1, 1] through ``tcpade.sample`` (the diffusers loop);
        ``config=None`` is full computation, or whatever cache is enabled on the transformer."""
        from ..integrations.sampling import sample

        g = self.spec.guidance_scale if guidance_scale is None else guidance_scale
        labels = torch.as_tensor(labels, dtype=torch.int64)
        cond = self.conditions(labels)
        uncond = self.conditions(torch.full_like(labels, self.spec.num_classes)) if g != 1 else None
        out = sample(
            self.transformer, self.noise_scheduler(), self.noise(seeds), cond=cond, uncond=uncond,
            guidance_scale=g, steps=steps, config=config, return_summary=return_summary, progress=False,
            timestep_scale=1e-3 if self.spec.family == "flux" else 1.0,
        )  # fmt: skip
        if return_summary:
            return self.to_images(out[0]).clamp(-1, 1), out[1]
        return self.to_images(out).clamp(-1, 1)


def build(name: str) -> ZooModel:
    """A randomly initialised zoo model (for training)."""
    if name not in SPECS:
        raise ValueError(f"unknown zoo model {name!r}; available: {names()}")
    torch.manual_seed(0)
    return ZooModel(SPECS[name])


def load(name: str) -> ZooModel:
    """The trained zoo model ``name`` (float32, eval mode) from the weights shipped with tcpade."""
    from safetensors.torch import load_file

    path = weights_path(name)
    if name in SPECS and not os.path.exists(path):
        raise FileNotFoundError(f"zoo model {name!r} has no weights at {path}; train it with bench/train.py")
    model = build(name)
    state = {k: v.float() for k, v in load_file(path).items()}
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def card(name: str) -> dict:
    """The training record of a zoo model (the JSON block of its model card)."""
    with open(os.path.join(_WEIGHTS, f"{name}.json")) as f:
        return json.load(f)
