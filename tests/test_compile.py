"""torch.compile of transformers with tcpade applied.

For tiny random-weight FLUX, Wan and DiT transformers, with the ``slow`` preset (9 of 20
steps computed), compiled two ways after ``tcpade.apply``:

* ``full``: ``torch.compile(transformer)`` (inductor);
* ``regional``: ``transformer.compile_repeated_blocks()`` (diffusers' regional compile:
  each repeated block compiled on its own; DiT has no ``_repeated_blocks`` in diffusers
  0.42.1, so its blocks are compiled one by one, which is what that method does).

FLUX compiles with inductor (C++ codegen on CPU, as users run it); Wan and DiT with
``aot_eager`` (dynamo and AOT autograd, where graph breaks, guards and recompiles live,
without inductor's code generation, which cost 30-190 s per model here on 2 shared cores
and is exercised by FLUX and by ``bench/compile.py``, which compiles all three with
inductor). The tcpade ops inside inductor graphs: the last test here and tests/test_ops.py.

Each runs two full 20-step denoising loops. The first is the warm-up (it compiles every
variant: the calls before and after the first skip differ in what the hooks see); the
second runs under ``torch._dynamo.config.error_on_recompile=True`` and must compile no
frame at all (dynamo's ``frames`` counter stays 0, and no recompile is logged). Both loops
must skip the same steps as the eager tcpade run (counted on the attention modules inside
the blocks, which run only when a block's own forward runs) and give its outputs within
tolerance.

Tolerance: inductor fuses and reorders fp32 arithmetic (other summation orders in norms
and matmul epilogues), so outputs differ from eager by a few fp32 ulps of the activations;
skipped steps extrapolate from residuals that carry those differences, and the Euler loop
carries them on. Measured on these models: FLUX (inductor) max |compiled - eager| 9.5e-7
on computed steps and 1.5e-6 on skipped ones, outputs up to 1.9; Wan and DiT (aot_eager)
bit-identical. 1e-4 absolute + 1e-4 relative is ~70x that.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from compile import CompileCount, EveryRead  # noqa: E402  (bench/compile.py)
from test_adapters import FAMILIES, BlockBodyCounter, blocks_of  # noqa: E402
from test_policy import run  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402
from tcpade.policy import Runtime  # noqa: E402

STEPS = 20
SLOW_COMPUTED = [0, 1, 2, 3, 4, 8, 12, 16, 19]
TOL = dict(atol=1e-4, rtol=1e-4)
BACKEND = {"flux": "inductor", "wan": "aot_eager", "dit": "aot_eager"}


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


def _regional(model, backend):
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend)
    else:  # DiT in diffusers 0.42.1: no _repeated_blocks; compile the repeated blocks directly
        for _, block in blocks_of(model):
            block.compile(backend=backend)
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
        call = torch.compile(model, backend=BACKEND[family])
    else:
        model = FAMILIES[family]()[0]  # same seed: the same weights as the eager model
        tcpade.apply(model, TCPadeConfig.slow(), num_steps=STEPS)
        call = _regional(model, BACKEND[family])
    counter = BlockBodyCounter(model)
    try:
        with CompileCount() as warm:
            first = trajectory(family, call, inputs)
        assert warm.frames > 0, "nothing was compiled"
        assert tcpade.summary(model).computed("default") == SLOW_COMPUTED
        counter.counts = dict.fromkeys(counter.counts, 0)
        with torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = trajectory(family, call, inputs)
        assert steady.frames == steady.graphs == 0 and steady.recompiles == [], (steady.frames, steady.recompiles[:1])
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


# ------------------------------------------------------------ decisions without a stall


CONFIGS = {
    "slow": TCPadeConfig.slow(),
    "fast": TCPadeConfig.fast(),
    "paper": TCPadeConfig.paper(),
    "error": TCPadeConfig(),
    "error-loose": TCPadeConfig(tolerance=0.3),
    "error-paper": TCPadeConfig(predictor="paper", tolerance=0.3, history_slots=5),
    "tsi-blocks": TCPadeConfig.slow(tsi_threshold=0.05, store_predictions=True),
}
FIELDS = ("k", "computed", "reason", "stage", "nonfinite")


@pytest.mark.parametrize("nan", [None, "output", "input"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_deferred_reads_decide_exactly_as_eager_reads(name, nan):
    """Reading the device sums only when a decision needs them (and predicting before the
    decision when that is harmless) changes no decision, no record and no output bit."""
    cfg = CONFIGS[name]
    kw = {"output": dict(nan_at=2), "input": dict(nan_input_at=9)}.get(nan, {})  # 2: then warm-up computes
    runs = {}
    for kind, rt in [("eager", EveryRead(cfg)), ("deferred", Runtime(cfg))]:
        rt, passes, _, outs = run(cfg, 20, branches=("cond", "uncond"), rt=rt, **kw)
        reads = rt.host_reads  # before the records are read (that read is the summary's, after sampling)
        runs[kind] = (rt, passes, outs, reads)
    (eager, p_e, o_e, r_e), (lazy, p_l, o_l, r_l) = runs["eager"], runs["deferred"]
    assert p_e == p_l
    for br in ("cond", "uncond"):
        a, b = eager.branches[br].records, lazy.branches[br].records
        assert [[getattr(r, f) for f in FIELDS] for r in a] == [[getattr(r, f) for f in FIELDS] for r in b]
        for ra, rb in zip(a, b):
            for f in ("tsi", "error"):
                x, y = getattr(ra, f), getattr(rb, f)
                assert x == y or (math.isnan(x) and math.isnan(y)), (br, ra.k, f, x, y)
        for x, y in zip(o_e[br], o_l[br]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert r_l < r_e, (r_l, r_e)


def test_waits_per_run_slow_preset():
    """slow, T = 20, one branch (9 computed, 11 skipped in 4 runs of skips): before, a wait
    at each of the 8 calls after a computed step and one per skip (19); now one per skip
    (11), the first skip of each run reading the computed step's sums in the same wait."""
    cfg = TCPadeConfig.slow()
    counts = []
    for rt in (EveryRead(cfg), Runtime(cfg)):
        rt = run(cfg, 20, rt=rt)[0]
        counts.append(rt.host_reads)
    assert counts == [19, 11]


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
    assert [r["tcpade"] for r in rows] == ["off", "on", "on/every-read"]
    assert [r["computed"] for r in rows] == [20, 9, 9]
    assert [r["host_waits"] for r in rows[1:]] == [11, 19]
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
