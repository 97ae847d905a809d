"""TCPadeConfig(level="output"): a skipped call returns the extrapolation of the transformer's
output and runs nothing of the transformer.

* every family of tcpade/tools/tiny.py (TINY: tiny random-weight models) but Z-Image, whose forward
  returns a list: with the "reuse" predictor a skipped call returns the last computed output
  bit for bit (0 + R1), in the structure the call asked for (``return_dict`` True or False),
  and no submodule of the transformer runs on it; Z-Image is refused at ``apply``;
* the rational and linear predictors on FLUX: each skipped output against the float64
  reference of the same extrapolation of the computed outputs (``tcpade.core.reference``);
* every pipeline variant (CFG as two calls or batched, img2img, Kontext, Wan2.2's two experts):
  the same calls computed as at block level, ``remove`` restoring the baseline; an input of
  another shape on a planned skip is computed, not predicted;
* ``torch.compile(fullgraph=True)``, whole model and regional: the same outputs as eager,
  no recompile on the second run.
"""

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402
from tcpade import coef as K  # noqa: E402  # noqa: E402
from tcpade import reference  # noqa: E402  # noqa: E402
from tcpade.tools.tiny import FAMILIES, CompileCount  # noqa: E402

from tcpade.tools.tiny import FAMILY_PIPELINES as PIPELINES, TINY  # noqa: E402
from helpers import assert_close, one_thread  # noqa: E402, F401  (one_thread: autouse, 1 torch thread)



class SubmoduleCounter:
    """Counts the calls of every submodule of a transformer (embeddings, blocks, norm_out, proj_out)."""

    def __init__(self, model):
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._bump) for m in model.modules() if m is not model]

    def _bump(self, module, args):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _sample(r):
    return r[0] if isinstance(r, tuple) else r.sample


REUSE = TCPadeConfig(predictor="reuse", schedule=(0,), schedule_steps=3, level="output")


@pytest.mark.parametrize("name", sorted(n for n in TINY if n != "zimage"))
@torch.no_grad()
def test_reuse_skip_is_the_last_output_and_runs_nothing(name):
    tiny = TINY[name]()
    plain = [_sample(tiny.model(**tiny.inputs(k), return_dict=False)) for k in range(3)]
    tcpade.apply(tiny.model, REUSE, num_steps=3)
    counter = SubmoduleCounter(tiny.model)
    try:
        out0 = tiny.model(**tiny.inputs(0), return_dict=False)
        ran = counter.count
        assert ran > 0
        out1 = tiny.model(**tiny.inputs(1), return_dict=False)  # skipped: reuse the output of step 0
        out2 = tiny.model(**tiny.inputs(2), return_dict=True)  # skipped, as a return_dict call
        assert counter.count == ran, f"{name}: {counter.count - ran} submodule calls on skipped calls"
        s = tcpade.summary(tiny.model)
    finally:
        counter.remove()
        tcpade.remove(tiny.model)
    assert isinstance(out0, tuple) and isinstance(out1, tuple) and len(out1) == 1
    assert torch.equal(out0[0], plain[0])  # a computed call is the plain forward
    assert torch.equal(out1[0], plain[0]) and torch.equal(out2.sample, plain[0])
    assert not torch.equal(plain[1], plain[0])  # (the model's output does depend on the step)
    assert s.computed("default") == [0] and s.skipped("default") == [1, 2]
    assert str(s).splitlines()[0].startswith("tcpade: predictor=reuse level=output schedule=1/3")
    # remove: the plain model again
    assert torch.equal(_sample(tiny.model(**tiny.inputs(1), return_dict=False)), plain[1])


def test_list_output_family_is_refused_at_apply():
    tiny = TINY["zimage"]()
    with pytest.raises(TypeError, match=r"level='output' cannot predict ZImageTransformer2DModel's output"):
        tcpade.apply(tiny.model, TCPadeConfig.fast(level="output"), num_steps=20)
    assert not tcpade.integrations.adapters.is_attached(tiny.model)
    tcpade.apply(tiny.model, TCPadeConfig.fast(), num_steps=20)  # block level runs it
    tcpade.remove(tiny.model)


T = 12
SCHEDULE = (0, 1, 2, 5, 8, 11)


@pytest.mark.parametrize("predictor", ["rational", "linear"])
@torch.no_grad()
def test_skipped_outputs_match_the_float64_extrapolation(predictor):
    """Each skipped call's output is the predictor's extrapolation of the branch's computed
    outputs at its time, as the float64 reference computes it from the same outputs and times.
    Tolerance: the fp32 kernel against float64 (helpers.tolerance)."""
    model, inputs, _ = FAMILIES["flux"]()
    cfg = TCPadeConfig(predictor=predictor, schedule=SCHEDULE, schedule_steps=T, level="output")
    tcpade.apply(model, cfg, num_steps=T)
    kw = dict(inputs(0))
    outs, times = [], []
    try:
        for k in range(T):
            s = 1.0 - k / T
            kw["timestep"] = torch.full_like(kw["timestep"], s)
            outs.append(model(**kw, return_dict=False)[0])
            times.append(s)
    finally:
        tcpade.remove(model)
    computed = []  # (time, output) of the computed calls so far, newest first
    for k in range(T):
        if k in SCHEDULE:
            computed.insert(0, (times[k], outs[k].double()))
            continue
        stage = K.stage_of(k, T, cfg.early_frac, cfg.late_frac)
        n = min(len(computed), cfg.history_slots)
        cf = K.build_coef(predictor, stage, [t for t, _ in computed[:3]], times[k], n, cfg.history_slots,
                          delta=cfg.pole_delta, kappa=cfg.kappa)  # fmt: skip
        ring = torch.stack([o for _, o in computed[: cfg.history_slots]])
        want, _ = reference.predict_math(torch.zeros_like(ring[0]), ring, list(range(cfg.history_slots)), cf,
                                         variant=predictor, cd=torch.float64)  # fmt: skip
        assert not torch.equal(outs[k], outs[k - 1])
        assert_close(outs[k], want, torch.float32, what=f"{predictor} step {k}")


# zimage: a list output, refused (above); flux-controlnet: every call carries control residuals.
OUTPUT_PIPELINES = sorted(set(PIPELINES) - {"zimage", "flux-controlnet"})


@pytest.mark.parametrize("name", OUTPUT_PIPELINES)
@torch.no_grad()
def test_pipelines_skip_the_same_calls_at_both_levels(name):
    """Each pipeline variant (CFG as two calls or batched, img2img / inpainting, Kontext's
    reference tokens, Wan2.2's two experts): output level computes exactly the calls block level
    computes, predicts the others with another value than block level, close to the full run,
    and ``remove`` restores the baseline."""
    pipe, generate = PIPELINES[name]()
    ref = generate()
    runs = {}
    for level in ("block", "output"):
        tcpade.apply(pipe, TCPadeConfig.fast(level=level))
        try:
            out = generate()
            s = tcpade.summary(pipe)
        finally:
            tcpade.remove(pipe)
        runs[level] = out, {b: (s.computed(b), s.skipped(b)) for b in s.branches}
    (block, plan), (out, plan_out) = runs["block"], runs["output"]
    assert plan_out == plan and all(skipped for _, skipped in plan.values())
    assert torch.isfinite(out).all() and not torch.equal(out, block)
    assert (out - ref).abs().max() < 10 * (block - ref).abs().max() + 1e-3
    assert torch.equal(generate(), ref)


@torch.no_grad()
def test_another_input_shape_on_a_skip_is_computed():
    tiny = TINY["flux"]()
    tcpade.apply(tiny.model, TCPadeConfig(predictor="reuse", schedule=(0, 1), schedule_steps=4, level="output"),
                 num_steps=4)  # fmt: skip
    try:
        for k in range(2):
            tiny.model(**tiny.inputs(k), return_dict=False)
        kw = tiny.inputs(2)
        kw["hidden_states"] = kw["hidden_states"][:, :-1]  # one image token fewer (FLUX: and its ids)
        kw["img_ids"] = kw["img_ids"][:-1]
        out = tiny.model(**kw, return_dict=False)[0]
        recs = tcpade.summary(tiny.model).branches["default"]
    finally:
        tcpade.remove(tiny.model)
    assert out.shape[1] == kw["hidden_states"].shape[1]
    assert torch.equal(out, tiny.model(**kw, return_dict=False)[0])  # the computed output
    assert recs[-1].computed  # (a new run: the shape changed)


STEPS = 16
PLAN = (0, 1, 2, 5, 8, 11, 14)


def _loop(call, inputs):
    kw = dict(inputs(0))
    x = kw["hidden_states"].clone()
    outs = []
    for k in range(STEPS):
        kw.update(hidden_states=x, timestep=torch.full_like(kw["timestep"], 1.0 - k / STEPS))
        out = call(**kw, return_dict=False)[0]
        outs.append(out)
        x = x - out / STEPS
    return outs


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_output_level_under_fullgraph_compile(mode):
    cfg = TCPadeConfig(schedule=PLAN, schedule_steps=STEPS, level="output")
    model, inputs, _ = FAMILIES["flux"]()
    tcpade.apply(model, cfg, num_steps=STEPS)
    with torch.no_grad():
        ref = _loop(model, inputs)
    tcpade.remove(model)
    torch._dynamo.reset()
    model, inputs, _ = FAMILIES["flux"]()
    rt = tcpade.apply(model, cfg, num_steps=STEPS)
    if mode == "full":
        call = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        call = model
    try:
        with torch.no_grad(), CompileCount() as warm:
            first = _loop(call, inputs)
        assert warm.graphs > 0 and warm.graph_breaks == 0
        waits = rt.host_reads
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True), CompileCount() as steady:
            second = _loop(call, inputs)
        assert steady.frames == steady.graphs == 0 and steady.recompiles == []
        assert rt.host_reads == waits + STEPS  # a bare transformer: each call's timestep, no decision wait
        assert tcpade.summary(model).computed("default") == list(PLAN)
    finally:
        tcpade.remove(model)
    for k in range(STEPS):
        assert torch.equal(first[k], ref[k]) and torch.equal(second[k], ref[k]), (mode, k)
