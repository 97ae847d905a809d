"""torch.compile of transformers with tcpade applied, with ``fullgraph=True``.

For the tiny random-weight FLUX, Wan, DiT and SD3 transformers (``tcpade.tools.tiny``), with the
``slow`` preset (9 of 20 steps computed), compiled two ways after ``tcpade.apply``:

* ``regional``: ``transformer.compile_repeated_blocks(fullgraph=True)`` (diffusers' regional
  compile, each repeated block compiled on its own; DiT and SD3 have no ``_repeated_blocks``
  in diffusers 0.42.1, so their blocks are compiled one by one with ``fullgraph=True``,
  which is what that method does);
* ``full``: ``torch.compile(transformer, fullgraph=True)``.

``fullgraph=True`` makes any graph break an error; the decision runs before the forward in
an eager hook, the block hooks trace into the graph. Each case runs two full 20-step
denoising loops: the first compiles (every block region gets two variants, compute and
skip; the first block of the stack one more pair, as it reads h_in); the second runs under
``torch._dynamo.config.error_on_recompile=True`` and must compile no frame at all (dynamo's
``frames`` counter stays 0, no recompile logged). Both loops must skip the same steps as the
eager tcpade run (counted on the attention modules inside the blocks, which run only when a
block's own forward runs) and give its outputs.

Backends: ``aot_eager`` (dynamo and AOT autograd: graph breaks, guards and recompiles all
live there) for every case, bit-identical to eager; inductor for FLUX (C++ code generation
on CPU, as users run it), whose fused fp32 arithmetic differs from eager by a few ulps of
the activations (other summation orders in norms and matmul epilogues); the skipped steps
extrapolate from residuals that carry those differences and the Euler loop carries them on.
1e-4 absolute + 1e-4 relative is far above that and far below any skip-pattern change.
"""

import pytest
import torch
from helpers import BlockBodyCounter, blocks_of

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402
from tcpade.tools.tiny import FAMILIES, CompileCount  # noqa: E402

STEPS = 20
SLOW_COMPUTED = [0, 3, 5, 8, 10, 13, 15, 18]  # slow(): 8 of 20, the spaced rule (no calibrated schedule)
EXACT = dict(atol=0.0, rtol=0.0)
INDUCTOR_TOL = dict(atol=1e-4, rtol=1e-4)


def _timestep(family, s, like):
    if family == "dit":
        return torch.full_like(like, int(999 * s))  # DiT: integer timesteps in [0, 1000)
    return torch.full_like(like, s if family == "flux" else 1000.0 * s)  # FLUX: sigma; others: 1000 sigma


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


def _regional(model, backend):
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    else:  # DiT, SD3 in diffusers 0.42.1: no _repeated_blocks; compile the repeated blocks directly
        for _, block in blocks_of(model):
            block.compile(fullgraph=True, backend=backend)
    return model


_EAGER = {}


def eager_reference(family):
    """The eager tcpade run each compiled run must reproduce (computed once per family)."""
    if family not in _EAGER:
        model, inputs, _ = FAMILIES[family]()
        tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
        counter = BlockBodyCounter(model)
        outs = trajectory(family, model, inputs)
        body = counter.snapshot()
        counter.remove()
        tcpade.remove(model)
        for name, block in blocks_of(model):  # each block body ran on the 9 computed steps only
            n_attn = sum("Attention" in type(m).__name__ for m in block.modules())
            assert body[name] == len(SLOW_COMPUTED) * n_attn, (name, body[name], n_attn)
        _EAGER[family] = (outs, body)
    return _EAGER[family]


CASES = [(f, m, "aot_eager") for f in ("flux", "wan", "dit", "sd3") for m in ("regional", "full")]
CASES += [("flux", "regional", "inductor")]


@pytest.mark.parametrize("family, mode, backend", CASES, ids=["-".join(c) for c in CASES])
def test_fullgraph_compile_keeps_skipping_without_recompiles(family, mode, backend):
    ref, ref_body = eager_reference(family)
    torch._dynamo.reset()
    model, inputs, _ = FAMILIES[family]()  # same seed: the same weights as the eager model
    rt = tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
    call = torch.compile(model, fullgraph=True, backend=backend) if mode == "full" else _regional(model, backend)
    counter = BlockBodyCounter(model)
    tol = EXACT if backend == "aot_eager" else INDUCTOR_TOL
    try:
        with CompileCount() as warm:
            first = trajectory(family, call, inputs)
        assert warm.graphs > 0, "nothing was compiled"
        assert warm.graph_breaks == 0
        assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
        counter.counts = dict.fromkeys(counter.counts, 0)
        waits = rt.host_reads
        with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = trajectory(family, call, inputs)
        assert steady.frames == steady.graphs == 0 and steady.recompiles == [], (steady.frames, steady.recompiles[:1])
        assert steady.graph_breaks == 0
        assert rt.host_reads == waits + STEPS  # a fixed schedule: no wait in the loop but each timestep's read
        assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
        # Skipping happened inside the compiled model: each block body ran on the 9 computed steps only.
        assert counter.snapshot() == ref_body
        for k in range(STEPS):
            torch.testing.assert_close(first[k], ref[k], **tol, msg=f"{family} {mode} warm-up step {k}")
            torch.testing.assert_close(second[k], ref[k], **tol, msg=f"{family} {mode} step {k}")
    finally:
        counter.remove()
        tcpade.remove(model)


def test_bench_compile_runs(tmp_path):
    """bench/compile.py keeps running (eager rows only here: compiling is what the tests above do)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["bench/compile.py", "--families", "dit", "--modes", "eager", "--reps", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["tcpade"] for r in rows] == ["off", "on"]
    assert [r["computed"] for r in rows] == [20, 8]
    assert rows[1]["host_waits"] == 0
    assert "| dit | eager | on |" in proc.stdout


def test_ops_inductor_dynamic_two_shapes():
    """Both ops in one inductor graph with dynamic=True: two shapes, one compile, eager results
    (tests/test_ops.py runs the same through aot_eager and a static inductor graph)."""
    from helpers import gen, randn, smooth_ring

    from tcpade import coef as K

    def step(h_in, h_out, ring, slots, cf):
        sums = torch.ops.tcpade.update(h_in, h_out, ring, slots, None, False)
        out, psums = torch.ops.tcpade.predict(h_in, ring, slots, cf, None, "rational", False, True)
        return out * 2.0 + 1.0, sums + psums

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="inductor")
    cf = K.coef_tensor(K.build_coef("rational", "middle", [0.61, 0.74, 0.93], 0.45, 3, 3), "cpu")
    with CompileCount() as cc:
        for shape in [(2, 7, 33), (3, 9, 33)]:  # (sizes 0 and 1 are always specialised by dynamo)
            g = gen(sum(shape))
            h_in, h_out = randn(shape, torch.float32, "cpu", g), randn(shape, torch.float32, "cpu", g)
            ring = smooth_ring(shape, 3, torch.float32, "cpu", g)
            slots = torch.tensor([2, 0, 1], dtype=torch.int32)
            ring_e = ring.clone()
            want = step(h_in, h_out, ring_e, slots, cf)
            got = compiled(h_in, h_out, ring, slots, cf)
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
            torch.testing.assert_close(ring, ring_e)
    assert cc.graphs == 1 and cc.recompiles == [], (cc.graphs, cc.recompiles[:1])


@torch.no_grad()
def test_pipeline_with_cfg_branches_under_regional_fullgraph():
    """A FLUX pipeline with true CFG (cond / uncond calls, one history each) under
    compile_repeated_blocks(fullgraph=True): the second run compiles nothing, and gives the
    eager run's latents and decisions."""
    from tcpade.tools.tiny import flux_pipeline

    pipe, generate = flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe, TCPadeConfig.slow())
    try:
        ref = generate(STEPS)
        torch._dynamo.reset()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        with CompileCount() as warm:
            first = generate(STEPS)
        assert warm.graphs > 0 and warm.graph_breaks == 0
        with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = generate(STEPS)
        assert steady.graphs == 0 and steady.recompiles == [], steady.recompiles[:1]
        s = tcpade.summary(pipe)
        assert s.computed("cond") == s.computed("uncond") == SLOW_COMPUTED
        torch.testing.assert_close(first, ref, **EXACT)
        torch.testing.assert_close(second, ref, **EXACT)
    finally:
        tcpade.remove(pipe)


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_auto_predictor_under_fullgraph_compile(mode, monkeypatch):
    """Predictor "auto": the online choice is a device-side row of the candidates' coefficients, so a
    compiled model neither breaks its graph nor recompiles when the choice changes, and reproduces
    eager bit for bit. (The device choice is flipped between linear and reuse at every computed
    step that chooses here, the same in the eager and the compiled runs.)"""
    from tcpade.core import layout as L
    from tcpade.policy import choosers

    real, calls = choosers.AutoChoice.probed, []
    names = [c.name for c in L.AUTO_CANDIDATES]

    def alternating(self, sums, lam1, tau1):
        real(self, sums, lam1, tau1)
        calls.append(1)
        self.index = torch.tensor(names.index("linear" if len(calls) % 2 else "reuse"), device=sums.device)
        return self.index.reshape(1).to(sums.dtype)

    monkeypatch.setattr(choosers.AutoChoice, "probed", alternating)
    cfg = TCPadeConfig.fast(predictor="auto")
    model, inputs, _ = FAMILIES["flux"]()
    tcpade.apply(model, cfg, num_steps=STEPS)
    ref = trajectory("flux", model, inputs)
    tcpade.remove(model)
    assert len(calls) == 4  # computed steps 7, 11, 14, 18 chose (linear, reuse, linear, reuse)
    plain = FAMILIES["flux"]()[0]
    tcpade.apply(plain, TCPadeConfig.fast(predictor="rational"), num_steps=STEPS)
    assert not torch.equal(trajectory("flux", plain, inputs)[-1], ref[-1])  # the flips changed the output
    tcpade.remove(plain)
    torch._dynamo.reset()
    model, inputs, _ = FAMILIES["flux"]()
    rt = tcpade.apply(model, cfg, num_steps=STEPS)
    call = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "full" else _regional(model, "aot_eager")
    try:
        calls.clear()
        with CompileCount() as warm:
            first = trajectory("flux", call, inputs)
        assert warm.graphs > 0 and warm.graph_breaks == 0
        waits = rt.host_reads
        calls.clear()
        with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = trajectory("flux", call, inputs)
        assert steady.frames == steady.graphs == 0 and steady.recompiles == [] and steady.graph_breaks == 0
        assert rt.host_reads == waits + STEPS  # each timestep's read (a bare transformer), no decision wait
        for k in range(STEPS):
            torch.testing.assert_close(first[k], ref[k], **EXACT, msg=f"warm-up step {k}")
            torch.testing.assert_close(second[k], ref[k], **EXACT, msg=f"step {k}")
    finally:
        tcpade.remove(model)
