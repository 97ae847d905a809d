"""TCPadeConfig(extrapolate="h_out"): a skipped call's block stack leaves with the extrapolation of
the computed calls' stack outputs h_out, the call's own h_in unused; "residual" (the paper's form)
adds the extrapolated residual h_out - h_in to the call's h_in.

* on a tiny FLUX transformer (both block kinds), every predictor: the input of ``norm_out`` (the
  stack's output) on each skipped call against the float64 reference of the same extrapolation
  (``tcpade.core.reference``) of the computed calls' stack outputs ("h_out") or of their residuals
  plus the call's stack input ("residual"), captured with torch hooks;
* "h_out" ignores the skipped call's input (another ``hidden_states`` on the skipped steps leaves
  their stack output bit for bit the same), "residual" does not;
* ``torch.compile(fullgraph=True)``, whole model and regional: the same outputs as eager;
* the field's checks; at level "output" both values give the same outputs.
Tolerance: the fp32 kernel against float64 (helpers.tolerance).
"""

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402
from tcpade import coef as K  # noqa: E402
from tcpade import reference  # noqa: E402
from tcpade.tools.tiny import FAMILIES, CompileCount  # noqa: E402
from helpers import assert_close, one_thread  # noqa: E402, F401  (one_thread: autouse, 1 torch thread)

T = 12
SCHEDULE = (0, 1, 2, 5, 8, 11)



def _outputs(call, inputs, other_input_at=()):
    """The outputs of T calls (timestep 1 - k / T; another hidden_states at ``other_input_at``)."""
    outs = []
    with torch.no_grad():
        for k in range(T):
            kw = dict(inputs(0))
            if k in other_input_at:
                kw["hidden_states"] = kw["hidden_states"] * 0.5 + 1.0
            kw["timestep"] = torch.full_like(kw["timestep"], 1.0 - k / T)
            outs.append(call(**kw, return_dict=False)[0])
    return outs


def _loop(model, inputs, cfg, other_input_at=()):
    """T calls of a bare FLUX transformer (timestep 1 - k / T); returns the stack's input and
    output of every call (the first block's hidden_states, norm_out's input) and the outputs."""
    seen = {"in": [], "out": []}
    first = model.transformer_blocks[0]
    hooks = [first.register_forward_pre_hook(lambda m, a, kw: seen["in"].append(kw["hidden_states"].clone()),
                                             with_kwargs=True),
             model.norm_out.register_forward_pre_hook(lambda m, a: seen["out"].append(a[0].clone()))]  # fmt: skip
    tcpade.apply(model, cfg, num_steps=T)
    try:
        outs = _outputs(model, inputs, other_input_at)
        computed = tcpade.summary(model).computed("default")
    finally:
        tcpade.remove(model)
        for h in hooks:
            h.remove()
    return seen, outs, computed


@pytest.mark.parametrize("extrapolate", ["h_out", "residual"])
@pytest.mark.parametrize("predictor", ["reuse", "linear", "rational", "auto"])
def test_skipped_stack_output_matches_the_float64_extrapolation(predictor, extrapolate):
    model, inputs, _ = FAMILIES["flux"]()
    cfg = TCPadeConfig(predictor=predictor, schedule=SCHEDULE, schedule_steps=T, extrapolate=extrapolate)
    seen, _, computed = _loop(model, inputs, cfg)
    assert computed == list(SCHEDULE)
    # the first block's pre-hook fires on computed calls only (a skip replaces the blocks' forwards)
    h_in = dict(zip(SCHEDULE, seen["in"]))
    hist = []  # (index time, what the history holds), newest first
    for k in range(T):
        h_out = seen["out"][k].double()
        if k in SCHEDULE:
            x = h_in[k].double()
            hist.insert(0, (float(k), h_out if extrapolate == "h_out" else h_out - x))
            continue
        if predictor == "auto":  # steps 3, 4: the first candidate (damped-2); step 5 probes and chooses
            if k > 5:
                continue  # (the chosen candidate's rows are checked in tests/test_auto.py)
            variant, kw = "linear", dict(damping=2.0)
        else:
            variant, kw = predictor, {}
        stage = K.stage_of(k, T, cfg.early_frac, cfg.late_frac)
        n = min(len(hist), cfg.history_slots)
        cf = K.build_coef(variant, stage, [t for t, _ in hist[:3]], float(k), n, cfg.history_slots,
                          delta=cfg.pole_delta, kappa=cfg.kappa, **kw)  # fmt: skip
        ring = torch.stack([r for _, r in hist[: cfg.history_slots]])
        base = torch.zeros_like(ring[0])
        if extrapolate == "residual":  # the call's own stack input: the embedding of this call's latents
            base = model.x_embedder(inputs(0)["hidden_states"]).double()
        want, _ = reference.predict_math(base, ring, list(range(cfg.history_slots)), cf, variant=variant,
                                         cd=torch.float64)  # fmt: skip
        assert_close(seen["out"][k], want, torch.float32, what=f"{predictor}/{extrapolate} step {k}")


@pytest.mark.parametrize("extrapolate", ["h_out", "residual"])
def test_h_out_ignores_the_skipped_calls_input(extrapolate):
    cfg = TCPadeConfig(predictor="linear", schedule=SCHEDULE, schedule_steps=T, extrapolate=extrapolate)
    model, inputs, _ = FAMILIES["flux"]()
    a, _, _ = _loop(model, inputs, cfg)
    b, _, _ = _loop(model, inputs, cfg, other_input_at=(3, 4, 6))
    for k in (3, 4, 6):
        assert torch.equal(a["out"][k], b["out"][k]) == (extrapolate == "h_out"), k
    assert torch.equal(a["out"][7], b["out"][7])  # the history itself is the same


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_h_out_under_fullgraph_compile(mode):
    cfg = TCPadeConfig(predictor="linear", schedule=SCHEDULE, schedule_steps=T, extrapolate="h_out")
    model, inputs, _ = FAMILIES["flux"]()
    _, ref, _ = _loop(model, inputs, cfg)
    torch._dynamo.reset()
    model, inputs, _ = FAMILIES["flux"]()
    tcpade.apply(model, cfg, num_steps=T)
    if mode == "full":
        call = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        call = model
    try:
        with CompileCount() as count:
            out = _outputs(call, inputs)
        assert count.graphs > 0 and count.graph_breaks == 0
        assert tcpade.summary(model).computed("default") == list(SCHEDULE)
    finally:
        tcpade.remove(model)
    for k in range(T):
        torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=1e-6, msg=f"{mode} step {k}")


def test_the_field_is_checked_and_moot_at_output_level():
    with pytest.raises(ValueError, match=r"TCPadeConfig.extrapolate must be one of \('residual', 'h_out'\)"):
        TCPadeConfig(extrapolate="output")
    with pytest.raises(TypeError, match="TCPadeConfig.extrapolate must be a str"):
        TCPadeConfig(extrapolate=1)
    outs = []
    for extrapolate in ("residual", "h_out"):
        model, inputs, _ = FAMILIES["flux"]()
        cfg = TCPadeConfig(predictor="linear", schedule=SCHEDULE, schedule_steps=T, level="output",
                           extrapolate=extrapolate)  # fmt: skip
        outs.append(_loop(model, inputs, cfg)[1])
    assert all(torch.equal(x, y) for x, y in zip(*outs))
