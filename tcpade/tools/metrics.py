"""Quality metrics against a reference (the full-computation output of the same seed).

PSNR and SSIM in plain torch (float64), so the demo needs no scikit-image; SSIM follows
scikit-image's ``structural_similarity`` defaults exactly (7x7 uniform window, K1 = 0.01,
K2 = 0.03, sample covariance, mean over the valid interior), which the tests check.
Values are in [-1, 1] (the zoo's range) unless ``data_range`` says otherwise.

* ``psnr`` takes any batch ``(N, ...)``: images, clips, FLUX's packed latents
  ``(N, tokens, C)``, Wan's video latents ``(N, C, F, H, W)``; the mean squared error is over
  everything but the batch dimension, so the layout does not matter.
* ``ssim`` needs a spatial layout: images ``(N, C, H, W)`` or clips ``(N, C, F, H, W)``
  (scored frame by frame). Anything else has no image layout to slide a window over (a
  3-d ``(N, tokens, C)`` tensor could as well be ``(N, H, W)``): ``ssim`` raises ValueError
  rather than guess, and ``has_ssim(x)`` says beforehand whether it applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PSNR_CAP", "has_ssim", "psnr", "ssim"]

# An exact match has infinite PSNR; report it as this many dB so means stay finite.
PSNR_CAP = 100.0

_LAYOUTS = "images (N, C, H, W) or clips (N, C, F, H, W)"


def has_ssim(x: torch.Tensor) -> bool:
    """Whether ``x`` has a layout SSIM is defined on here: images (N, C, H, W) or clips (N, C, F, H, W)."""
    return x.ndim in (4, 5)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, C, F, H, W) -> (N, frames * C, H, W) float64."""
    x = x.detach().double()
    if x.ndim == 5:
        n, c, f, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(n, f * c, h, w)
    return x


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB (N,) of any batch (N, ...), capped at PSNR_CAP for an exact match."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.ndim == 0:
        raise ValueError("psnr: expected a batch (N, ...), got a 0-d tensor")
    if not data_range > 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range!r}")
    n = x.shape[0]
    diff = x.detach().double().reshape(n, -1) - ref.detach().double().reshape(n, -1)
    mse = diff.pow(2).mean(1)
    out = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    return out.clamp(max=PSNR_CAP)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, win: int = 7) -> torch.Tensor:
    """Per-sample SSIM (N,) of images or clips, the mean over channels / frames of
    scikit-image's SSIM; ValueError for any other layout (``has_ssim``)."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if not has_ssim(x):
        raise ValueError(f"ssim: needs {_LAYOUTS}, got shape {tuple(x.shape)}; a tensor without an image "
                         "layout (e.g. FLUX's packed latents (N, tokens, C)) has PSNR only")  # fmt: skip
    x, ref = _frames(x), _frames(ref)
    n, c, h, w = x.shape
    if min(h, w) < win:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {win}x{win} window")
    a = x.reshape(n * c, 1, h, w)
    b = ref.reshape(n * c, 1, h, w)
    kernel = torch.full((1, 1, win, win), 1.0 / win**2, dtype=torch.float64)
    npix = win * win
    cov = npix / (npix - 1)  # sample covariance, as scikit-image's default

    def f(t):
        return F.conv2d(t, kernel)

    ux, uy = f(a), f(b)
    vx = cov * (f(a * a) - ux * ux)
    vy = cov * (f(b * b) - uy * uy)
    vxy = cov * (f(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # scikit-image crops (win - 1) // 2 pixels on each side of the (already valid-mode) map:
    # a "valid" convolution is exactly that crop of its "same"-mode filter output.
    return s.flatten(1).mean(1).reshape(n, c).mean(1)
