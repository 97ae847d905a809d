"""tcpade::update on every backend, dtype and odd shape, against the float64 reference."""

import math

import pytest
import torch
from helpers import DTYPE_IDS, DTYPES, SHAPES, assert_close, gen, perm_slots, randn, smooth_ring

from tcpade import ops, reference, tsi_from_sums
from tcpade.core.layout import NSUMS, SUMS

NONFINITE = SUMS.index("nonfinite")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nslot", [3, 4])
@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("with_prev", [False, True])
def test_update_matches_reference(backend, dtype, shape, nslot, probe, with_prev):
    device, _ = backend
    g = gen(hash((shape, nslot, probe, with_prev)) % 10_000)
    h_in = randn(shape, dtype, device, g)
    h_out = randn(shape, dtype, device, g)
    ring = smooth_ring(shape, nslot, dtype, device, g)
    slots = perm_slots(nslot, device, g)
    prev = randn(shape, dtype, device, g) if with_prev else None

    ref_ring = ring.cpu().clone()
    ref_prev = prev.cpu().clone() if with_prev else None
    ref = reference.update(h_in.cpu(), h_out.cpu(), ref_ring, slots.cpu(), ref_prev, probe, torch.float64)

    got = ops.update(h_in, h_out, ring, slots, prev, probe)
    assert got.dtype == torch.float32 and got.shape == (NSUMS,)
    # The stored residual is one rounding of (h_out - h_in): compare it with the float64
    # value rounded once; at bf16/fp16 the fp32 difference may round the other way.
    assert_close(ring.cpu(), ref_ring, dtype, what="ring")
    if with_prev:
        assert torch.equal(prev.cpu(), ref_prev), "h_prev must hold h_in exactly"
    # Sums are accumulated in fp32 over <= 4000 terms: relative error well under 1e-5.
    for i in range(NSUMS):
        assert math.isclose(got[i].item(), ref[i].item(), rel_tol=1e-5, abs_tol=1e-4), (SUMS[i], got, ref)
    if not probe:
        assert got[SUMS.index("err2")].item() == 0.0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tsi_within_1e5_fp32(backend, shape):
    """TSI from the fused sums vs 0.5*||u1 - u2|| computed directly in float64."""
    device, _ = backend
    g = gen(7)
    nslot = 3
    ring = smooth_ring(shape, nslot, torch.float32, device, g)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    h_in = randn(shape, torch.float32, device, g)
    h_out = h_in + ring[2] + 0.3 * (ring[2] - ring[0]) + 0.1 * randn(shape, torch.float32, device, g)
    r1, r2 = ring[2].cpu().double(), ring[0].cpu().double()
    r_new = h_out.cpu().double() - h_in.cpu().double()
    sums = ops.update(h_in, h_out, ring, slots, None, False)
    d1, d2 = r1 - r2, r_new - r1
    direct = 0.5 * (d1 / d1.norm() - d2 / d2.norm()).norm().item()
    assert 0.0 < direct < 1.0
    assert abs(tsi_from_sums(sums.tolist()) - direct) <= 1e-5


def test_tsi_definition_edges():
    assert tsi_from_sums([1.0, 1.0, 1.0]) == 0.0  # same direction
    assert math.isclose(tsi_from_sums([1.0, 1.0, -1.0]), 1.0)  # full reversal
    assert math.isclose(tsi_from_sums([1.0, 1.0, 0.0]), 0.5 * math.sqrt(2.0))  # right angle
    assert tsi_from_sums([0.0, 1.0, 0.0]) == 0.0  # no movement counts as stable
    assert math.isnan(tsi_from_sums([float("nan"), 1.0, 0.0]))
    assert math.isnan(tsi_from_sums([float("inf"), 1.0, 0.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_update_nan_is_visible(backend, dtype):
    device, _ = backend
    g = gen(3)
    shape = (1, 6, 40)
    h_in = randn(shape, dtype, device, g)
    h_out = randn(shape, dtype, device, g)
    h_out[0, 2, 5] = float("nan")
    h_out[0, 4, 1] = float("inf")
    ring = smooth_ring(shape, 3, dtype, device, g)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    sums = ops.update(h_in, h_out, ring, slots, None, False).tolist()
    assert sums[NONFINITE] == 2.0
    assert math.isnan(tsi_from_sums(sums))
    # A non-finite value in the stored history shows up in the TSI of the next write.
    h_out2 = randn(shape, dtype, device, g)
    slots2 = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    sums2 = ops.update(h_in, h_out2, ring, slots2, None, False).tolist()
    assert sums2[NONFINITE] == 0.0 and math.isnan(tsi_from_sums(sums2))


def test_update_fp16_overflow_is_visible(backend):
    """A residual that overflows float16 storage is counted, though each input is finite."""
    device, _ = backend
    shape = (1, 3, 20)
    h_in = torch.full(shape, -40000.0, dtype=torch.float16, device=device)
    h_out = torch.full(shape, 40000.0, dtype=torch.float16, device=device)
    ring = torch.zeros((3, *shape), dtype=torch.float16, device=device)
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    sums = ops.update(h_in, h_out, ring, slots, None, False).tolist()
    assert sums[NONFINITE] == 60.0
    assert torch.isinf(ring[2]).all()
