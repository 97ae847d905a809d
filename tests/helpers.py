"""Shared tolerances and input builders for the kernel tests.

Tolerance rule (architecture.md): every backend is compared with the float64 reference.
* float32 storage: |got - ref| <= 1e-5 * (1 + max|ref|). The kernels do O(10) fp32
  operations per element (each rounding <= 6e-8 relative) on operands of at most a few
  times the output's scale, and the rational fit's row reductions over C <= 257
  channels add ~C * 6e-8 relative to b1: all well under 1e-5.
* bfloat16 / float16 storage (arithmetic is fp32 in the kernels): the flash-attention
  rule, error <= 2x that of the same math done in plain torch at that dtype, floored at
  one unit in the last place of the dtype at the output's scale (a single rounding of
  the result can always differ by one ulp from rounding the float64 value).
"""

import torch

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# Odd sizes on purpose: nothing is a multiple of a block or of a vector width.
SHAPES = [(1, 7, 33), (2, 5, 129), (3, 11, 17)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def tolerance(dtype, ref64: torch.Tensor, lowprec: torch.Tensor = None) -> float:
    scale = ref64.detach().abs().max().item()
    if dtype == torch.float32:
        return 1e-5 * (1.0 + scale)
    floor = EPS[dtype] * max(scale, 1e-3)
    if lowprec is None:
        return floor
    return max(2.0 * max_err(lowprec, ref64), floor)


def assert_close(got, ref64, dtype, lowprec=None, what=""):
    err = max_err(got, ref64)
    tol = tolerance(dtype, ref64, lowprec)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} ({dtype})"


def gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g


def randn(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def smooth_ring(shape, nslot, dtype, device, g):
    """A ring whose residuals drift smoothly (like a real trajectory) plus noise."""
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    vel = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
    slots = [base + vel * i + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64) for i in range(nslot)]
    return torch.stack(slots).to(dtype).to(device)


def perm_slots(nslot, device, g):
    """A random age->slot map, as a real ring has after some steps."""
    return torch.randperm(nslot, generator=g).to(torch.int32).to(device)


def flow_sigmas(steps: int, shift: float = 3.0) -> list:
    """FLUX-style shifted sigmas: sigma' = shift*s / (1 + (shift-1)*s), s uniform in (1, 0]."""
    out = []
    for k in range(steps):
        s = 1.0 - k / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out
