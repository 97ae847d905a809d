"""Training data for the model zoo: real images that ship inside PyPI packages (no download).

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes),
  resized to 16x16.
* ``faces``: the LFW subset bundled with scikit-image, 200 grey 25x25 crops: 100 faces
  (class 0) and 100 non-faces (class 1), centre-cropped to 24x24.
* ``moving_digits``: short clips of a digit (10x10) gliding across a 16x16 frame on a
  straight line with a random direction, bouncing off the border.

* ``shapes``: procedural RGB scenes (``shapes``), 16 classes = 4 shapes x 4 colours, on
  textured backgrounds, at random positions, sizes and rotations.
* ``photos``: RGB patches of 12 photographs and textures bundled with scikit-image
  (``photos``), 12 classes = the source image, at random positions, scales and flips.

All images are float32 in [-1, 1], layout (N, C, H, W) with C = 1 (grey) or 3 (RGB); clips
are (N, 1, F, H, W).
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


# ------------------------------------------------------------------------------------- RGB data
# The two harder data sets: RGB, 12-16 classes, detail at every scale.

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}


def _shape_mask(kind, u, v, r):
    """Soft-edged mask in [0, 1] of a shape of radius r at the origin of the (rotated) coordinates u, v."""
    if kind == 0:  # circle
        d = (u * u + v * v).sqrt() - r
    elif kind == 1:  # square
        d = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    elif kind == 2:  # equilateral triangle: the largest of three half-plane distances
        d = torch.stack([u * np.cos(a) + v * np.sin(a) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                                 np.pi / 2 + 4 * np.pi / 3)]).amax(0) - 0.5 * r
    else:  # cross: a plus sign with arms of width 0.7 r
        d = torch.maximum(torch.minimum(u.abs(), v.abs()) - 0.35 * r, torch.maximum(u.abs(), v.abs()) - r)
    return (0.5 - d * 12.0).clamp(0, 1)  # a ramp 1/12 wide (one pixel at 24x24): antialiased edges


def _pattern(kind, x, y, g, n):
    """A background / fill pattern in [0, 1] of one of four kinds, random frequency, angle and phase."""
    theta = torch.rand(n, 1, 1, generator=g) * np.pi
    freq = 6.0 + 10.0 * torch.rand(n, 1, 1, generator=g)
    phase = torch.rand(n, 1, 1, generator=g) * 2 * np.pi
    u = x * torch.cos(theta) + y * torch.sin(theta)
    v = -x * torch.sin(theta) + y * torch.cos(theta)
    if kind == 0:  # stripes
        return 0.5 + 0.5 * torch.sin(freq * u + phase)
    if kind == 1:  # checkerboard (soft)
        return (0.5 + 2.0 * torch.sin(freq * u + phase) * torch.sin(freq * v)).clamp(0, 1)
    if kind == 2:  # dots
        return ((torch.cos(freq * u + phase) * torch.cos(freq * v) - 0.3) * 3.0).clamp(0, 1)
    # smooth random blobs: 5x5 noise, bicubic up to the frame
    low = torch.rand(n, 1, 5, 5, generator=g)
    return F.interpolate(low, size=x.shape[-2:], mode="bicubic", align_corners=True)[:, 0].clamp(0, 1)


def shapes(n: int, size: int = 24, seed: int = 0):
    """n procedural scenes (n, 3, size, size) in [-1, 1] and their labels (n,) int64.

    A scene: a background of one of four textures (stripes, checkerboard, dots, blobs) in two
    random muted colours; a small grey distractor shape; and the object of the class, one of
    4 shapes (circle, square, triangle, cross) x 4 colours (red, green, blue, yellow), label =
    shape * 4 + colour, at a random position, size and rotation, filled with its colour under a
    striped shading. Shape edges are soft (about one pixel wide), so no supersampling is
    needed. Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    x, y = x.expand(n, size, size), y.expand(n, size, size)
    labels = torch.randint(len(SHAPES) * len(COLOURS), (n,), generator=g)
    # background
    bg_kind = torch.randint(4, (n,), generator=g)
    c1 = 0.15 + 0.6 * torch.rand(n, 3, 1, 1, generator=g)
    c2 = 0.15 + 0.6 * torch.rand(n, 3, 1, 1, generator=g)
    p = torch.empty(n, 1, size, size)
    for k in range(4):
        idx = (bg_kind == k).nonzero().flatten()
        p[idx, 0] = _pattern(k, x[idx], y[idx], g, len(idx))
    img = c1 * (1 - p) + c2 * p
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)

    def place(kinds, radius, colour, shading):
        cx = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * (0.9 - radius)
        cy = (torch.rand(n, 1, 1, generator=g) * 2 - 1) * (0.9 - radius)
        rot = torch.rand(n, 1, 1, generator=g) * 2 * np.pi
        dx, dy = x - cx, y - cy
        u = dx * torch.cos(rot) + dy * torch.sin(rot)
        v = -dx * torch.sin(rot) + dy * torch.cos(rot)
        m = torch.empty(n, 1, size, size)
        for k in range(len(SHAPES)):
            idx = (kinds == k).nonzero().flatten()
            m[idx, 0] = _shape_mask(k, u[idx], v[idx], radius[idx])
        return m, colour * shading(u)

    # the distractor: small, grey, any shape
    r_d = 0.12 + 0.08 * torch.rand(n, 1, 1, generator=g)
    grey = 0.3 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    m, fill = place(torch.randint(len(SHAPES), (n,), generator=g), r_d, grey.expand(n, 3, 1, 1),
                    lambda u: torch.ones_like(u)[:, None])
    img = img * (1 - m) + fill * m
    # the object of the class
    r_o = (0.28 + 0.22 * torch.rand(n, 1, 1, generator=g))
    colour = palette[labels % len(COLOURS)].view(n, 3, 1, 1) * (0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
    sf = 10.0 + 10.0 * torch.rand(n, 1, 1, generator=g)
    m, fill = place(labels // len(COLOURS), r_o, colour, lambda u: (0.75 + 0.25 * torch.sin(sf * u))[:, None])
    img = img * (1 - m) + fill * m
    img = img.clamp(0, 1)
    return img * 2 - 1, labels


# RGB photographs and textures bundled with scikit-image (skimage/data/*.png, no download);
# the grey textures get a fixed tint each so that every class has colour.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "stereo_motorcycle", "brick", "grass", "gravel", "moon")  # fmt: skip
_TINTS = {"brick": (1.0, 0.55, 0.4), "grass": (0.55, 1.0, 0.45), "gravel": (0.8, 0.8, 0.95), "moon": (1.0, 0.95, 0.7)}


def _photo(name):
    from skimage import data

    a = getattr(data, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity): the left view
        a = a[0]
    a = a.astype(np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None] * np.asarray(_TINTS[name], np.float32)
    return torch.from_numpy(a[..., :3]).permute(2, 0, 1).contiguous()  # (3, H, W)


def photos(n: int, size: int = 24, seed: int = 0):
    """n patches (n, 3, size, size) in [-1, 1] of the 12 images of ``PHOTOS`` (label = the
    image), each cut at a random position from the image downscaled by a random factor of
    2-5 (a patch spans 2-5 x size source pixels), randomly flipped. Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(PHOTOS), (n,), generator=g)
    scale = 2.0 + 3.0 * torch.rand(n, generator=g)
    fy, fx = torch.rand(n, generator=g), torch.rand(n, generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty(n, 3, size, size)
    for c, name in enumerate(PHOTOS):
        img = _photo(name)
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        _, h, w = img.shape
        span = (scale[idx] * size).round().long()
        # the crops, resampled to size x size with an affine grid (antialias: area-like via 2x then pool)
        y0 = (fy[idx] * (h - span)).floor()
        x0 = (fx[idx] * (w - span)).floor()
        t = (torch.arange(2 * size, dtype=torch.float32) + 0.5) / (2 * size)
        ys = (y0[:, None] + t[None] * span[:, None]) / h * 2 - 1  # (k, 2 size)
        xs = (x0[:, None] + t[None] * span[:, None]) / w * 2 - 1
        grid = torch.stack([xs[:, None, :].expand(-1, 2 * size, -1), ys[:, :, None].expand(-1, -1, 2 * size)], -1)
        patch = F.grid_sample(img[None].expand(len(idx), -1, -1, -1), grid, mode="bilinear", align_corners=False)
        out[idx] = F.avg_pool2d(patch, 2)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.clamp(0, 1) * 2 - 1, labels


def for_spec(spec, clips: int = 12000, seed: int = 1):
    """(x, labels) of a zoo model's data (``Spec.data``) at its sample shape; ``clips`` (the
    number of samples) and ``seed`` apply to the generated data sets (moving digits, shapes,
    photo patches) only."""
    if spec.data == "digits":
        return digits(spec.sample_shape[-1])
    if spec.data == "faces":
        return faces()
    if spec.data == "moving_digits":
        return moving_digits(clips, frames=spec.sample_shape[1], size=spec.sample_shape[-1], seed=seed)
    if spec.data == "shapes":
        return shapes(clips, size=spec.sample_shape[-1], seed=seed)
    if spec.data == "photos":
        return photos(clips, size=spec.sample_shape[-1], seed=seed)
    raise ValueError(f"unknown zoo data {spec.data!r}")
