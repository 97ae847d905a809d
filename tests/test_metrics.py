"""tcpade.tools.metrics against scikit-image (the reference implementation of PSNR and SSIM)."""

import numpy as np
import pytest
import torch

from tcpade import metrics

skm = pytest.importorskip("skimage.metrics")


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 1, 24, 23), (2, 3, 9, 13), (2, 1, 4, 16, 16)])
@pytest.mark.parametrize("noise", [1e-3, 0.1, 1.0])
def test_psnr_ssim_match_skimage(shape, noise):
    g = torch.Generator().manual_seed(sum(shape))
    ref = torch.rand(shape, generator=g) * 2 - 1
    x = (ref + noise * torch.randn(shape, generator=g)).clamp(-1, 1)
    got_p, got_s = metrics.psnr(x, ref), metrics.ssim(x, ref)
    for i in range(shape[0]):
        a, b = x[i].double().numpy(), ref[i].double().numpy()
        planes = [(a[c], b[c]) for c in range(a.shape[0])] if a.ndim == 3 else [
            (a[c, f], b[c, f]) for c in range(a.shape[0]) for f in range(a.shape[1])]  # fmt: skip
        want_s = np.mean([skm.structural_similarity(p, q, data_range=2.0) for p, q in planes])
        want_p = skm.peak_signal_noise_ratio(b, a, data_range=2.0)
        # float64 both ways: the only differences are summation order (~1e-15 relative)
        assert got_s[i].item() == pytest.approx(want_s, rel=1e-10, abs=1e-12)
        assert got_p[i].item() == pytest.approx(want_p, rel=1e-10)


def test_exact_match_and_errors():
    x = torch.rand(2, 1, 8, 8)
    assert torch.all(metrics.psnr(x, x) == metrics.PSNR_CAP)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(x, x[:1])
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        metrics.ssim(torch.rand(1, 1, 5, 8), torch.rand(1, 1, 5, 8))
    with pytest.raises(ValueError, match="0-d tensor"):
        metrics.psnr(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="data_range must be > 0"):
        metrics.psnr(x, x, data_range=0.0)


@pytest.mark.parametrize("shape", [(3,), (2, 16, 64), (2, 16, 2, 4, 4), (1, 2, 3, 4, 5, 6), (2, 1, 8, 8)])
def test_psnr_takes_any_batch_layout(shape):
    """PSNR is the MSE over everything but the batch dimension: packed FLUX latents (N, tokens, C),
    Wan latents (N, C, F, H, W), a batch of scalars; the same number in any layout of the values."""
    g = torch.Generator().manual_seed(len(shape))
    ref = torch.randn(shape, generator=g)
    x = ref + 0.1 * torch.randn(shape, generator=g)
    got = metrics.psnr(x, ref, data_range=4.0)
    n = shape[0]
    mse = (x.double() - ref.double()).reshape(n, -1).pow(2).mean(1)
    assert got.shape == (n,) and torch.allclose(got, 10 * torch.log10(16.0 / mse), rtol=1e-12)
    # the layout does not matter: the same values as a flat (N, D) batch
    assert torch.equal(got, metrics.psnr(x.reshape(n, -1), ref.reshape(n, -1), data_range=4.0))
    assert torch.all(metrics.psnr(ref, ref) == metrics.PSNR_CAP)


@pytest.mark.parametrize("shape", [(3,), (2, 16, 64), (2, 16, 16), (1, 2, 3, 4, 5, 6)])
def test_ssim_refuses_layouts_without_images(shape):
    """SSIM slides a window over H x W: only images and clips have one. A 3-d tensor is refused,
    not guessed at (FLUX's packed (N, tokens, C) and a grey (N, H, W) look the same)."""
    x = torch.rand(shape)
    assert not metrics.has_ssim(x)
    with pytest.raises(ValueError, match=r"ssim: needs images \(N, C, H, W\) or clips \(N, C, F, H, W\), got shape"):
        metrics.ssim(x, x)
    assert metrics.has_ssim(torch.rand(2, 1, 8, 8)) and metrics.has_ssim(torch.rand(2, 1, 3, 8, 8))
