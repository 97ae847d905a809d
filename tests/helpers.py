"""Shared test helpers: tolerances and input builders for the kernel tests, a synthetic
block stack for the policy tests, a counter of block bodies run in hooked models.

Tolerance rule: every backend is compared with the float64 reference.
* float32 storage: |got - ref| <= 1e-5 * (1 + max|ref|). The kernels do O(10) fp32
  operations per element (each rounding <= 6e-8 relative) on operands of at most a few
  times the output's scale, and the rational fit's row reductions over C <= 257
  channels add ~C * 6e-8 relative to b1: all well under 1e-5.
* bfloat16 / float16 storage (arithmetic is fp32 in the kernels): the flash-attention
  rule, error <= 2x that of the same math done in plain torch at that dtype, floored at
  one unit in the last place of the dtype at the output's scale (a single rounding of
  the result can always differ by one ulp from rounding the float64 value).
"""

import pytest
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


# ------------------------------------------------------------------ a synthetic block stack
# The "model" of the policy tests: exact and cheap, the block stack's residual is a smooth
# rational function of the schedule's sigma, so predictions can be compared with the truth
# and the block-stack passes counted directly.
SYNTH_SHAPE = (1, 16, 24)


def truth(seed, shape=SYNTH_SHAPE):
    """step(sigma) -> (h_in, residual) of one synthetic trajectory."""
    import math

    g = torch.Generator().manual_seed(seed)
    a, b, d = (torch.randn(shape, generator=g) for _ in range(3))
    c = 0.5 * torch.rand(*shape[:-1], 1, generator=g)
    data, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def step(s):
        h_in = data * (1 - s) + noise * s
        # Rational in sigma plus a wiggle no [1/1] rational captures exactly.
        return h_in, (a + b * s) / (1 + c * s) + 0.05 * d * math.sin(6.0 * s)

    return step


def synthetic_run(cfg, T, branches=("default",), nan_at=None, stop_at=None, rt=None, shape_seed=0, nan_input_at=None,
                  shape=SYNTH_SHAPE):  # fmt: skip
    """T steps of the synthetic stack through a Runtime's decide / finish, as the hooks call
    them. Returns (runtime, passes per branch, relative errors of the skipped steps, outputs)."""
    from tcpade.policy.runtime import Runtime

    rt = rt or Runtime(cfg)
    rt.set_steps(T)
    truths = {br: truth(shape_seed + i, shape) for i, br in enumerate(branches)}
    passes = {br: 0 for br in branches}
    errors = {br: [] for br in branches}
    outs = {br: [] for br in branches}
    for k, s in enumerate(flow_sigmas(T)):
        if stop_at is not None and k == stop_at:
            break
        for br in branches:
            h_in, r = truths[br](s)
            if nan_input_at is not None and k == nan_input_at:
                h_in = h_in.clone()
                h_in[0, 1, 1] = float("nan")
            predict = rt.decide(br, float(s))
            pred = predict(h_in) if predict is not None else None
            if pred is None:
                passes[br] += 1
                h_out = h_in + r
                if nan_at is not None and k == nan_at:
                    h_out = h_out.clone()
                    h_out[0, 3, 4] = float("nan")
                rt.finish(br, h_in, h_out)
                outs[br].append(h_out)
            else:
                rt.finish(br, None, None)
                errors[br].append(((pred - h_in - r).norm() / r.norm()).item())
                outs[br].append(pred)
    return rt, passes, errors, outs


# ---------------------------------------------------------------------- hooked diffusers models
def blocks_of(model):
    from tcpade.integrations import adapters

    return adapters.find_adapter(model).stack(model)


class BlockBodyCounter:
    """Counts, per block, calls to the attention modules INSIDE the block: they run only when the
    block's own forward runs. (A torch hook on the block itself would fire on skipped calls too,
    because the module's __call__ still happens; DiT calls transformer_blocks[0].norm1.emb after
    the stack, so norm submodules are not a clean signal either.) The counts are tensors bumped
    in place, so the hooks trace into a compiled block region without a guard on a Python int."""

    def __init__(self, model):
        self._counts = {}
        self.handles = []
        for name, block in blocks_of(model):
            self._counts[name] = torch.zeros((), dtype=torch.int64)
            attn = [m for m in block.modules() if "Attention" in type(m).__name__]
            assert attn, name
            for m in attn:
                self.handles.append(m.register_forward_pre_hook(self._bump(self._counts[name])))

    @staticmethod
    def _bump(count):
        def hook(module, args):
            count.add_(1)

        return hook

    @property
    def counts(self):
        return {name: int(c) for name, c in self._counts.items()}

    @counts.setter
    def counts(self, values):
        for name, v in values.items():
            self._counts[name].fill_(v)

    def snapshot(self):
        return self.counts

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------- fixed TSI rules
# The TSI policy's rules with a TSI that never blocks (threshold 1): fixed schedules known in
# advance ("fixed rule"), which many policy tests use. They were slow() and fast() before those
# presets became compute budgets (TCPadeConfig.budget): slow = 9 of 20, fast = 7 of 20.
RULE_SLOW = dict(predictor="rational", policy="tsi", tsi_threshold=1.0, warmup=4, interval=4, final_steps=1,
                 max_skips=3)  # fmt: skip
RULE_FAST = dict(RULE_SLOW, warmup=2, final_steps=0)


def rule_slow(**overrides):
    from tcpade.policy.config import TCPadeConfig

    return TCPadeConfig(**{**RULE_SLOW, **overrides})


def rule_fast(**overrides):
    from tcpade.policy.config import TCPadeConfig

    return TCPadeConfig(**{**RULE_FAST, **overrides})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op torch thread for the tests of a module that imports this fixture
    (``from helpers import one_thread``; autouse there). The tiny models' ops take microseconds:
    one thread runs them several times faster than a pool whose threads spin-wait (tens of times
    on a machine shared with other jobs, as the test machines' two cores are)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
