"""tcpade.integrations.adapters on tiny random-weight diffusers transformers (no downloads).

For each supported family (FLUX, Wan, DiT, SD3):
1. a controller that always computes leaves the output bit-identical and sees h_in/h_out of the
   image tokens only;
2. an "oracle" controller that returns the recorded h_out reproduces the full output, with zero
   block bodies run on the skipped calls;
3. detach restores the unhooked model; double attach and unsupported models raise;
4. the branch is the active cache-context name, "default" outside one;
5. a tiny WanPipeline runs end to end with cond/uncond branches.
"""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402
from helpers import BlockBodyCounter, blocks_of  # noqa: E402

from tcpade.integrations import adapters  # noqa: E402
from tcpade.tools.tiny import FAMILIES, TXT  # noqa: E402, F401  (TXT: the text tokens of the tiny models)
from tcpade.tools.tiny import flux_pipeline as _flux_pipeline  # noqa: E402
from tcpade.tools.tiny import wan_pipeline as _wan_pipeline  # noqa: E402

NCALLS = 3


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, inputs, image_shape = FAMILIES[request.param]()
    with torch.no_grad():
        ref = [run(model, inputs(k)) for k in range(NCALLS)]
    return request.param, model, inputs, image_shape, ref


def run(model, kw):
    return model(**kw, return_dict=False)[0]


class Recorder:
    """Always computes; records what it is given. Optionally replays a script of predictions.

    ``begins``: (branch, h_in, timestep) per call; ``ends``: (branch, h_in, h_out) per computed call."""

    def __init__(self, predictions=None):
        self.predictions = predictions or {}
        self.calls = 0
        self.begins, self.ends = [], []

    def decide(self, branch, timestep, force=None):
        self.begins.append([branch, None, timestep])
        pred = self.predictions.get(self.calls)
        self.calls += 1
        return None if pred is None else self._skip(pred)

    def _skip(self, pred):
        def predict(h_in):
            self.begins[-1][1] = h_in.clone()
            return pred

        return predict

    def finish(self, branch, h_in, h_out):
        if h_in is not None:
            self.begins[-1][1] = h_in.clone()
            self.ends.append((branch, h_in.clone(), h_out.clone()))


@torch.no_grad()
def test_compute_is_bit_identical_and_sees_image_tokens(family):
    name, model, inputs, image_shape, ref = family
    rec = Recorder()
    adapters.attach(model, rec)
    try:
        assert adapters.is_attached(model)
        for k in range(NCALLS):
            assert torch.equal(run(model, inputs(k)), ref[k])
    finally:
        adapters.detach(model)
    assert len(rec.begins) == len(rec.ends) == NCALLS
    for k, ((branch, h_in, ts), (branch2, h_in2, h_out)) in enumerate(zip(rec.begins, rec.ends)):
        assert branch == branch2 == "default"
        assert ts == float(inputs(k)["timestep"].reshape(-1)[0])  # the call's time, read once on the host
        assert tuple(h_in.shape) == tuple(h_out.shape) == image_shape
        assert torch.equal(h_in, h_in2)
        assert not torch.equal(h_in, h_out)


@torch.no_grad()
def test_oracle_skip_reproduces_output_and_runs_no_block(family):
    name, model, inputs, image_shape, ref = family
    full = Recorder()
    adapters.attach(model, full)
    try:
        for k in range(NCALLS):
            run(model, inputs(k))
    finally:
        adapters.detach(model)
    recorded = {k: e[2] for k, e in enumerate(full.ends)}

    skip = {1, 2}
    oracle = Recorder(predictions={k: recorded[k] for k in skip})
    counter = BlockBodyCounter(model)
    adapters.attach(model, oracle)
    try:
        for k in range(NCALLS):
            before = counter.snapshot()
            out = run(model, inputs(k))
            ran = {b: counter.counts[b] - before[b] for b in before}
            assert torch.equal(out, ref[k]), (name, k, (out - ref[k]).abs().max())
            if k in skip:
                assert all(v == 0 for v in ran.values()), (name, k, ran)
            else:
                assert all(v > 0 for v in ran.values()), (name, k, ran)
    finally:
        adapters.detach(model)
        counter.remove()
    # end() only on computed calls, begin() on all.
    assert len(oracle.begins) == NCALLS and len(oracle.ends) == NCALLS - len(skip)
    # h_in of the skipped calls equals the full run's h_in: embeddings still run.
    for k in range(NCALLS):
        assert torch.equal(oracle.begins[k][1], full.begins[k][1])


@torch.no_grad()
def test_detach_double_attach_and_unsupported(family):
    name, model, inputs, image_shape, ref = family
    had_registry = hasattr(model, "_diffusers_hook")
    adapters.attach(model, Recorder(predictions={0: torch.zeros(image_shape)}))
    with pytest.raises(RuntimeError, match="already attached"):
        adapters.attach(model, Recorder())
    assert not torch.equal(run(model, inputs(0)), ref[0])  # the skip took effect
    adapters.detach(model)
    assert not adapters.is_attached(model)
    assert torch.equal(run(model, inputs(0)), ref[0])
    # Nothing left behind: no instance-level forward, no hook registry we created.
    for _, block in blocks_of(model):
        assert "forward" not in block.__dict__ and not hasattr(block, "_diffusers_hook")
    assert "forward" not in model.__dict__
    assert hasattr(model, "_diffusers_hook") == had_registry
    # Re-attach works after detach.
    adapters.attach(model, Recorder())
    adapters.detach(model)


def test_unsupported_models_raise_type_error():
    for model in (
        torch.nn.Linear(2, 2),
        UNet2DModel(
            block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)
        ),
    ):
        with pytest.raises(TypeError) as info:
            adapters.attach(model, Recorder())
        msg = str(info.value)
        for cls in (
            "FluxTransformer2DModel",
            "WanTransformer3DModel",
            "DiTTransformer2DModel",
            "SD3Transformer2DModel",
        ):
            assert cls in msg
        assert "recipe" in msg and "tcpade/integrations/adapters.py" in msg
        assert not adapters.is_attached(model)


@torch.no_grad()
def test_branches_follow_cache_context(family):
    name, model, inputs, image_shape, ref = family
    rec = Recorder()
    adapters.attach(model, rec)
    try:
        has_native = hasattr(model, "cache_context")
        assert has_native == (name in ("flux", "wan"))  # DiT and SD3 lack CacheMixin in diffusers 0.42
        ctx = model.cache_context if has_native else (lambda b: adapters.cache_context(model, b))
        with ctx("cond"):
            out_c = run(model, inputs(0))
        with ctx("uncond"):
            run(model, inputs(1))
        run(model, inputs(2))
        if has_native:  # tcpade's helper defers to the native one
            with adapters.cache_context(model, "cond"):
                run(model, inputs(0))
    finally:
        adapters.detach(model)
    assert torch.equal(out_c, ref[0])
    expect = ["cond", "uncond", "default"] + (["cond"] if has_native else [])
    assert [b[0] for b in rec.begins] == expect
    assert [e[0] for e in rec.ends] == expect


@torch.no_grad()
def test_sd3_skip_layers_still_decides_and_ends():
    model, inputs, image_shape = FAMILIES["sd3"]()
    rec = Recorder()
    adapters.attach(model, rec)
    try:
        ref = run(model, inputs(0))
        out = model(**inputs(0), skip_layers=[0, 2], return_dict=False)[0]  # first and last block not called
    finally:
        adapters.detach(model)
    assert not torch.equal(out, ref)
    assert len(rec.begins) == len(rec.ends) == 2
    # h_in is still the pos_embed output (skipped layers pass it through unchanged).
    assert torch.equal(rec.begins[0][1], rec.begins[1][1])


@torch.no_grad()
def test_bad_prediction_shape_raises():
    model, inputs, image_shape = FAMILIES["dit"]()
    adapters.attach(model, Recorder(predictions={0: torch.zeros(1, 2, 3)}))
    try:
        with pytest.raises(ValueError, match="like h_in"):
            run(model, inputs(0))
        run(model, inputs(0))  # state was cleaned up after the error
    finally:
        adapters.detach(model)


class _Counting(Recorder):
    """Computes the first `skip_after` calls of each branch, then replays that branch's newest h_out."""

    def __init__(self, skip_after=None):
        super().__init__()
        self.skip_after = skip_after
        self.resets = 0

    def decide(self, branch, timestep, force=None):
        super().decide(branch, timestep, force)
        n = sum(1 for b in self.begins if b[0] == branch)
        if self.skip_after is not None and n > self.skip_after:
            return self._skip([e for e in self.ends if e[0] == branch][-1][2])
        return None

    def reset(self):
        self.resets += 1


@pytest.mark.parametrize("make", [_wan_pipeline, _flux_pipeline], ids=["wan", "flux"])
@torch.no_grad()
def test_pipeline_end_to_end_branches(make):
    pipe, generate = make()
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    ref = generate()

    ctl = _Counting()
    adapters.attach(transformer, ctl)
    try:
        out = generate()
        assert torch.equal(out, ref)
        assert [b[0] for b in ctl.begins] == ["cond", "uncond"] * 4
        assert [e[0] for e in ctl.ends] == ["cond", "uncond"] * 4
        # A controller without step_time gets the timestep the pipeline passed, read once per
        # call as a host float (FLUX: t / 1000).
        scale = 1000.0 if make is _flux_pipeline else 1.0
        got = [b[2] for b in ctl.begins[::2]]
        assert got == pytest.approx([float(t) / scale for t in pipe.scheduler.timesteps])
        assert ctl.resets == 1  # maybe_free_model_hooks -> reset_stateful_hooks at the end of the call
        adapters.detach(transformer)

        ctl2 = _Counting(skip_after=2)
        adapters.attach(transformer, ctl2)
        out2 = generate()
        assert out2.shape == ref.shape and torch.isfinite(out2).all()
        assert [b[0] for b in ctl2.begins] == ["cond", "uncond"] * 4
        assert [e[0] for e in ctl2.ends] == ["cond", "uncond"] * 2  # steps 3 and 4 skipped in both branches
    finally:
        adapters.detach(transformer)
    assert torch.equal(generate(), ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_checkpointing_path(name):
    """With grad enabled and gradient checkpointing on, the models call their blocks positionally
    through torch.utils.checkpoint: the hooks must still find h_in and skip."""
    model, inputs, image_shape = FAMILIES[name]()
    model.enable_gradient_checkpointing()
    with torch.no_grad():
        ref = run(model, inputs(0))
    full = Recorder()
    adapters.attach(model, full)
    try:
        out = run(model, inputs(0))
        assert torch.allclose(out, ref, atol=1e-6, rtol=0)
        oracle = Recorder(predictions={0: full.ends[0][2].detach()})
        adapters.detach(model)
        adapters.attach(model, oracle)
        counter = BlockBodyCounter(model)
        out2 = run(model, inputs(0))
        counter.remove()
        assert torch.allclose(out2, ref, atol=1e-6, rtol=0)
        assert sum(counter.counts.values()) == 0 and oracle.ends == []
    finally:
        adapters.detach(model)


def test_block_specs_come_from_diffusers_registry():
    """Registered block classes get diffusers' metadata; tcpade's own table only fills what the
    registry lacks or gets wrong (Z-Image's block takes `x`; FLUX.2's single block passes
    cat(text, image))."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from tcpade.integrations import families

    flux = families.registry_block(FluxSingleTransformerBlock)
    assert (flux.hidden_arg, flux.image_index, flux.encoder_index) == ("hidden_states", 1, 0)
    assert families.OWN_BLOCKS["ZImageTransformerBlock"].hidden_arg == "x"
    assert families.registry_block(ZImageTransformerBlock).hidden_arg == "hidden_states"  # the registry's
    assert families.OWN_BLOCKS["Flux2SingleTransformerBlock"].tokens == "last"
    assert families.registry_block(Flux2SingleTransformerBlock).tokens == "all"
    assert adapters.SUPPORTED is families.FAMILIES  # one table, one class: Family


def test_unknown_block_class_raises_type_error():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    family = adapters.Family("x", ("blocks",))
    with pytest.raises(TypeError, match="TransformerBlockRegistry"):
        family.spec_for(model.blocks[0])
    with pytest.raises(ValueError, match="stacks"):
        adapters.Family("x", ())


@torch.no_grad()
def test_repeated_timestep_outside_a_context_is_its_own_branch():
    """Two calls in a row at one timestep without cache contexts (a pipeline's cond and uncond
    calls) go to branches "default" and "default.2"; a new timestep starts at "default" again."""
    model, inputs, image_shape = FAMILIES["dit"]()
    rec = Recorder()
    adapters.attach(model, rec)
    try:
        for k in (0, 0, 1, 1, 1, 1, 1, 2):
            run(model, inputs(k))
        model._diffusers_hook.reset_stateful_hooks()
        run(model, inputs(2))
    finally:
        adapters.detach(model)
    assert [b[0] for b in rec.begins] == [
        "default", "default.2", "default", "default.2", "default.3", "default.4", "default.4", "default", "default"
    ]


class _Forced(Recorder):
    """Wants to skip every call with a zero prediction; records the force reasons it is given."""

    def __init__(self):
        super().__init__()
        self.forced = []

    def decide(self, branch, timestep, force=None):
        super().decide(branch, timestep)
        self.forced.append(force)
        return None if force else self._skip_with(torch.zeros_like)

    def _skip_with(self, make):
        def predict(h_in):
            self.begins[-1][1] = h_in.clone()
            return make(h_in)

        return predict


@torch.no_grad()
def test_controlnet_residuals_force_a_compute():
    """A call with block-level ControlNet residuals is announced with force="control" and computed,
    so the residuals reach the output; a call without them is skipped as the controller asks."""
    model, inputs, image_shape = FAMILIES["flux"]()
    g = torch.Generator().manual_seed(3)
    control = dict(controlnet_block_samples=[torch.randn(image_shape, generator=g)],
                   controlnet_single_block_samples=[torch.randn(image_shape, generator=g)])  # fmt: skip
    ref = run(model, {**inputs(0), **control})
    assert not torch.equal(ref, run(model, inputs(0)))
    ctl = _Forced()
    adapters.attach(model, ctl)
    try:
        out = run(model, {**inputs(0), **control})
        skipped = run(model, inputs(1))
    finally:
        adapters.detach(model)
    assert torch.equal(out, ref)
    assert ctl.forced == ["control", None] and len(ctl.ends) == 1
    assert not torch.equal(skipped, run(model, inputs(1)))
