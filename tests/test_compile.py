"""torch.compile of transformers with tcpade applied (issue 5).

For tiny random-weight FLUX, Wan and DiT transformers, with the ``slow`` preset (9 of 20
steps computed), compiled two ways after ``tcpade.apply``:

* ``full``: ``torch.compile(transformer)`` (inductor);
* ``regional``: ``transformer.compile_repeated_blocks()`` (diffusers' regional compile:
  each repeated block compiled on its own; DiT has no ``_repeated_blocks`` in diffusers
  0.42.1, so its blocks are compiled one by one, which is what that method does).

Each runs two full 20-step denoising loops. The first is the warm-up (it compiles every
variant: the calls before and after the first skip differ in what the hooks see); the
second runs under ``torch._dynamo.config.error_on_recompile=True`` and must compile no
frame at all (dynamo's ``frames`` counter stays 0, and no recompile is logged). Both loops
must skip the same steps as the eager tcpade run (counted on the attention modules inside
the blocks, which run only when a block's own forward runs) and give its outputs within
tolerance.

Tolerance: inductor fuses and reorders fp32 arithmetic (different summation order in
norms and matmul epilogues), so a computed step differs from eager by a few fp32 ulps of
the activations (measured max ~1e-6 on outputs of size ~1-5); a skipped step extrapolates
residuals linearly-ish from those (coefficients of size <= ~3), and the Euler loop
accumulates over 20 steps: 1e-4 absolute + 1e-4 relative is ~50x the measured gap and
still far below the O(1e-2..1) gap between a computed and a skipped step.
"""

import logging

import pytest
import torch

pytest.importorskip("diffusers")

from test_adapters import FAMILIES, BlockBodyCounter, blocks_of  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402

STEPS = 20
SLOW_COMPUTED = [0, 1, 2, 3, 4, 8, 12, 16, 19]
TOL = dict(atol=1e-4, rtol=1e-4)


def _timestep(family, s, like):
    if family == "dit":
        return torch.full_like(like, int(999 * s))  # DiT: integer timesteps in [0, 1000)
    return torch.full_like(like, s if family == "flux" else 1000.0 * s)  # FLUX: sigma; Wan: 1000 sigma


@torch.no_grad()
def trajectory(family, call, inputs):
    """A 20-step Euler loop x <- x - dt * v on the transformer's prediction v."""
    kw = dict(inputs(0))
    x = kw["hidden_states"].clone()
    outs = []
    for k in range(STEPS):
        s = 1.0 - k / STEPS
        kw.update(hidden_states=x, timestep=_timestep(family, s, kw["timestep"]))
        out = call(**kw, return_dict=False)[0]
        outs.append(out)
        x = x - out[:, : x.shape[1]] / STEPS  # DiT predicts (eps, variance): the first half is eps
    return outs


class CompileCount:
    """Frames dynamo compiled (its ``frames`` counter) and recompiles it logged, in a block."""

    def __init__(self):
        self.recompiles = []

    def __enter__(self):
        counters.clear()
        torch._logging.set_logs(recompiles=True)
        self._log = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._handler = logging.Handler()
        self._handler.emit = lambda rec: self.recompiles.append(rec.getMessage())
        self._log.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        self._log.removeHandler(self._handler)
        torch._logging.set_logs()
        self.frames = counters["frames"]["total"]
        self.graph_breaks = sum(counters["graph_break"].values())


def _regional(model):
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks()
    else:  # DiT in diffusers 0.42.1: no _repeated_blocks; compile the repeated blocks directly
        for _, block in blocks_of(model):
            block.compile()
    return model


@pytest.fixture(scope="module", params=["flux", "wan", "dit"])
def eager_reference(request):
    """The eager tcpade run each compiled run must reproduce."""
    family = request.param
    model, inputs, _ = FAMILIES[family]()
    tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
    counter = BlockBodyCounter(model)
    outs = trajectory(family, model, inputs)
    body = counter.snapshot()
    counter.remove()
    assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
    for name, block in blocks_of(model):  # each block body ran on the 9 computed steps only
        n_attn = sum("Attention" in type(m).__name__ for m in block.modules())
        assert body[name] == len(SLOW_COMPUTED) * n_attn, (name, body[name], n_attn)
    return family, model, inputs, outs, body


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_transformer_keeps_skipping_without_recompiles(eager_reference, mode):
    family, eager_model, inputs, ref, ref_body = eager_reference
    torch._dynamo.reset()
    if mode == "full":
        model = eager_model
        tcpade.runtime(model).reset()
        call = torch.compile(model)
    else:
        model = FAMILIES[family]()[0]  # same seed: the same weights as the eager model
        tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
        call = _regional(model)
    counter = BlockBodyCounter(model)
    try:
        with CompileCount() as warm:
            first = trajectory(family, call, inputs)
        assert warm.frames > 0, "nothing was compiled"
        assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
        counter.counts = dict.fromkeys(counter.counts, 0)
        with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = trajectory(family, call, inputs)
        assert steady.frames == 0 and steady.recompiles == [], (steady.frames, steady.recompiles[:1])
        assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
        # Skipping happened inside the compiled model: each block body ran on the 9 computed steps only.
        assert counter.snapshot() == ref_body
        for k in range(STEPS):
            torch.testing.assert_close(first[k], ref[k], **TOL, msg=f"{family} {mode} warm-up step {k}")
            torch.testing.assert_close(second[k], ref[k], **TOL, msg=f"{family} {mode} step {k}")
    finally:
        counter.remove()
        if mode == "regional":
            tcpade.remove(model)
