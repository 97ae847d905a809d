"""Training data for the model zoo: real images that ship inside PyPI packages (no download).

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes),
  resized to 16x16.
* ``faces``: the LFW subset bundled with scikit-image, 200 grey 25x25 crops: 100 faces
  (class 0) and 100 non-faces (class 1), centre-cropped to 24x24.
* ``moving_digits``: short clips of a digit (10x10) gliding across a 16x16 frame on a
  straight line with a random direction, bouncing off the border.

All images are float32 in [-1, 1], layout (N, C=1, H, W); clips are (N, 1, F, H, W).
scikit-learn and scikit-image are needed only here (training and the quality benchmark),
never to load a trained model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def digits(size: int = 16):
    """(images (N, 1, size, size) in [-1, 1], labels (N,) int64) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.from_numpy(d.target.astype(np.int64))


def faces():
    """(images (200, 1, 24, 24) in [-1, 1], labels: 0 face, 1 non-face) of skimage's LFW subset."""
    from skimage import data

    x = torch.from_numpy(data.lfw_subset().astype(np.float32))[:, None, :24, :24]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)  # per-image contrast stretch: the crops vary 3x in range
    labels = torch.cat([torch.zeros(100, dtype=torch.int64), torch.ones(100, dtype=torch.int64)])
    return x * 2 - 1, labels


def moving_digits(n: int, frames: int = 6, size: int = 16, digit: int = 10, seed: int = 0):
    """n clips (n, 1, frames, size, size) in [-1, 1] of a digit moving in a straight line, and its labels."""
    imgs, labels = digits(digit)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(imgs), (n,), generator=g)
    room = size - digit
    start = torch.rand(n, 2, generator=g) * room
    angle = torch.rand(n, generator=g) * 2 * np.pi
    speed = 1.0 + torch.rand(n, generator=g)  # 1-2 pixels per frame
    vel = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * speed[:, None]
    out = torch.full((n, 1, frames, size, size), -1.0)
    for f in range(frames):
        pos = start + vel * f
        # reflect at the borders: a triangle wave of period 2 * room
        pos = room - (pos % (2 * room) - room).abs()
        pos = pos.round().long()
        for i in range(n):
            y, x = int(pos[i, 0]), int(pos[i, 1])
            out[i, 0, f, y : y + digit, x : x + digit] = torch.maximum(
                out[i, 0, f, y : y + digit, x : x + digit], imgs[idx[i], 0]
            )
    return out, labels[idx]


def for_spec(spec, clips: int = 12000, seed: int = 1):
    """(x, labels) of a zoo model's data (``Spec.data``) at its sample shape; ``clips`` and
    ``seed`` apply to the generated moving-digit clips only."""
    if spec.data == "digits":
        return digits(spec.sample_shape[-1])
    if spec.data == "faces":
        return faces()
    if spec.data == "moving_digits":
        return moving_digits(clips, frames=spec.sample_shape[1], size=spec.sample_shape[-1], seed=seed)
    raise ValueError(f"unknown zoo data {spec.data!r}")
