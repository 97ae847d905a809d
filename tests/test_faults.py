"""The diffusers integration under faults: no stale state, no silent degradation.

Tiny random-weight pipelines (tests/test_adapters.py). Covered elsewhere and not repeated:
resolution, batch size and step count changing between calls (test_api.py), an exception
between begin and end at the Runtime level (test_policy.py), op-level input errors such
as mismatched devices, wrong shapes, non-contiguous state buffers (test_ops.py), invalid
config values (test_policy.py).

Not testable here: CPU offload. ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``
need an accelerator, and accelerate's ``cpu_offload`` with the CPU as execution device fails
on these pipelines without tcpade too ("Cannot copy out of meta tensor"). Moving a pipeline
between devices is tested when a GPU is present (pending a GPU run).
"""

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import BlockBodyCounter, rule_fast, rule_slow  # noqa: E402

from tcpade.tools.tiny import flux_pipeline as _flux_pipeline  # noqa: E402
from tcpade.tools.tiny import wan_pipeline as _wan_pipeline  # noqa: E402

import tcpade  # noqa: E402
from tcpade import TCPadeConfig  # noqa: E402  # noqa: E402

STEPS = 12
SLOW12 = [0, 1, 2, 3, 4, 8, 11]  # the slow preset's computed calls at T = 12 (test_api.py)


def _flux():
    pipe, generate = _flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate


def _summary(pipe):
    s = tcpade.summary(pipe)
    return {br: [(r.k, r.computed, r.reason, r.nonfinite) for r in recs] for br, recs in s.branches.items()}


class _Fault:
    """A forward hook on a module that acts at its n-th call (0-based) only."""

    def __init__(self, module, at, action):
        self.n, self.at, self.action = 0, at, action
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        n, self.n = self.n, self.n + 1
        return self.action(output) if n == self.at else output

    def remove(self):
        self.handle.remove()


class _InnerFault(_Fault):
    """The same, as a diffusers hook registered before tcpade's: tcpade's block hook then
    runs outside it and sees the faulty output as the block's own (a torch forward hook
    would act after tcpade has read the output)."""

    def __init__(self, module, at, action):
        from diffusers.hooks import HookRegistry, ModelHook

        fault = self

        class Hook(ModelHook):
            def post_forward(self, module, output):
                return fault(module, (), output)

        self.n, self.at, self.action, self.module = 0, at, action, module
        HookRegistry.check_if_exists_or_initialize(module).register_hook(Hook(), "fault")

    def remove(self):
        self.module._diffusers_hook.remove_hook("fault", recurse=False)


def _image(output):  # a FLUX block returns (encoder_hidden_states, hidden_states)
    return output[1] if isinstance(output, tuple) else output


@torch.no_grad()
def test_exception_mid_run_leaves_no_stale_state():
    pipe, generate = _flux()
    tcpade.apply(pipe, rule_slow())
    try:
        clean = generate(STEPS)
        clean_dec = _summary(pipe)

        def boom(output):
            raise RuntimeError("injected fault")

        # Call 13 = step 6's cond call: mid-run, with history stored and skips behind it.
        fault = _Fault(pipe.transformer.transformer_blocks[0], 10, boom)
        with pytest.raises(RuntimeError, match="injected fault"):
            generate(STEPS)
        fault.remove()
        # The next call is exactly the clean one: same output bits, same decisions.
        assert torch.equal(generate(STEPS), clean)
        assert _summary(pipe) == clean_dec
        # Also after a fault inside the very first call, and with another step count next.
        fault = _Fault(pipe.transformer.transformer_blocks[0], 0, boom)
        with pytest.raises(RuntimeError):
            generate(STEPS)
        fault.remove()
        assert torch.equal(generate(STEPS), clean)
        generate(7)
        assert [r.k for r in tcpade.summary(pipe).branches["cond"]] == list(range(7))
    finally:
        tcpade.remove(pipe)


@pytest.mark.parametrize("cfg", [rule_slow(), rule_slow(tsi_threshold=0.999)],
                         ids=["fixed", "tsi-blocking"])  # fmt: skip
@torch.no_grad()
def test_nan_at_step_k_is_reported_and_does_not_leak(cfg):
    """A NaN in h_out at step 4: a fixed schedule keeps its decisions (it reads nothing from the
    device to decide) and the summary reports the step; a trajectory-dependent policy computes
    every step from 4 on. Neither leaks into the next call."""
    pipe, generate = _flux()
    counter = BlockBodyCounter(pipe.transformer)

    def nan(output):
        img = _image(output).clone()
        img[0, 0, 0] = float("nan")
        return (output[0], img) if isinstance(output, tuple) else img

    # On the last block's output (h_out), armed below; inner to tcpade's hook (see _InnerFault).
    fault = _InnerFault(pipe.transformer.single_transformer_blocks[-1], None, nan)
    tcpade.apply(pipe, cfg)
    try:
        clean = generate(STEPS)
        clean_dec = _summary(pipe)
        counter.counts = dict.fromkeys(counter.counts, 0)
        fault.n, fault.at = 0, 8  # the last block's 9th run = step 4's cond call (0-4 compute)
        generate(STEPS)
        s = tcpade.summary(pipe)
        cond = s.branches["cond"]
        assert cond[4].nonfinite and cond[4].computed, str(s)
        assert "non-finite values at steps [4" in str(s)
        if cfg.plan(STEPS) is not None:
            assert [(r.k, r.computed, r.reason) for r in cond] == [d[:3] for d in clean_dec["cond"]], str(s)
            assert "fixed schedule was kept" in str(s)
        else:
            assert all(r.computed for r in cond[4:]), str(s)
            assert all(r.reason == "nonfinite" for r in cond[5:]), str(s)
            # The NaN reaches the uncond branch through the latents at step 5: its prediction
            # there falls back (non-finite where h_in is, counted); the next history write it
            # reads is non-finite too, and from there on it computes every step.
            uncond = s.branches["uncond"]
            assert not uncond[5].computed and uncond[5].nonfinite, str(s)
            first = next(r.k for r in uncond if r.computed and r.nonfinite)
            assert all(r.computed for r in uncond[first + 1:]), str(s)
        # The next call does not inherit the poisoning.
        assert torch.equal(generate(STEPS), clean)
        assert _summary(pipe) == clean_dec
    finally:
        tcpade.remove(pipe)
        fault.remove()
        counter.remove()


@torch.no_grad()
def test_fp16_overflow_in_a_residual():
    """h_in and h_out finite in fp16, their difference is not: the step is flagged; the fixed
    schedule goes on, its predictions falling back to h_in + R1 with the overflowed elements
    of R1 as 0, so what the model gets stays finite."""
    pipe, generate = _flux_pipeline(torch.float16)
    pipe.set_progress_bar_config(disable=True)

    def big(sign):
        def act(output):
            img = _image(output).clone()
            img[0, 0, 0] = sign * 40000.0
            return (output[0], img) if isinstance(output, tuple) else img

        return act

    # Step 3's cond call is call 6: h_in (x_embedder's output) -40000, h_out +40000.
    faults = [_Fault(pipe.transformer.x_embedder, 6, big(-1)),
              _InnerFault(pipe.transformer.single_transformer_blocks[-1], 6, big(+1))]  # fmt: skip
    rt = tcpade.apply(pipe, rule_slow())
    outs = []
    hook = pipe.transformer.norm_out.register_forward_pre_hook(lambda m, args: outs.append(args[0].clone()))
    try:
        generate(STEPS)
        for f in faults:
            f.remove()
        s = tcpade.summary(pipe)
        cond = s.branches["cond"]
        assert cond[3].nonfinite, str(s)
        assert [r.k for r in cond if r.computed] == SLOW12
        assert rt.host_reads <= 3  # the schedule's copy to the host, and the summary's after the run
        assert all(torch.isfinite(o).all() for k, o in enumerate(outs) if k // 2 > 3), "a non-finite prediction"
        hist = tcpade.runtime(pipe).branches["cond"].history
        assert hist.ring.dtype == torch.float16
    finally:
        hook.remove()
        tcpade.remove(pipe)


@torch.no_grad()
def test_two_pipelines_in_one_process():
    """Two pipelines with tcpade, called alternately: each gets exactly its solo result."""
    flux, gen_flux = _flux()
    wan, gen_wan = _wan_pipeline()
    wan.set_progress_bar_config(disable=True)
    tcpade.apply(flux, rule_slow())
    tcpade.apply(wan, rule_fast())
    try:
        solo_flux, dec_flux = gen_flux(STEPS), _summary(flux)
        solo_wan, dec_wan = gen_wan(STEPS), _summary(wan)
        for _ in range(2):
            assert torch.equal(gen_flux(STEPS), solo_flux)
            assert torch.equal(gen_wan(STEPS), solo_wan)
        assert _summary(flux) == dec_flux and _summary(wan) == dec_wan
        assert [r.k for r in tcpade.summary(flux).branches["cond"] if r.computed] == SLOW12
        assert tcpade.runtime(flux) is not tcpade.runtime(wan)
    finally:
        tcpade.remove(flux)
        tcpade.remove(wan)


def _generate_in_model_dtype(pipe, steps):
    """_flux_pipeline's call, with the prompt embeddings on the transformer's device and dtype."""
    from tcpade.tools.tiny import TXT

    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    g = torch.Generator().manual_seed(1)
    pe, pp, ne, npp = (torch.randn(*shape, generator=g).to(device, dtype) for shape in [(1, TXT, 32), (1, 32)] * 2)
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npp,
                true_cfg_scale=2.0, height=16, width=16, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


@torch.no_grad()
def test_pipeline_moved_to_another_dtype_between_calls():
    """``pipe.to(dtype)`` between calls: the history follows the hidden states (reallocated)
    and the run equals a fresh apply on the moved pipeline, decisions included."""
    pipe, _ = _flux()
    tcpade.apply(pipe, rule_slow())
    try:
        _generate_in_model_dtype(pipe, STEPS)
        pipe.to(torch.bfloat16)
        moved = _generate_in_model_dtype(pipe, STEPS)
        assert tcpade.runtime(pipe).branches["cond"].history.ring.dtype == torch.bfloat16
        assert torch.isfinite(moved).all()
        moved_dec = _summary(pipe)
    finally:
        tcpade.remove(pipe)
    tcpade.apply(pipe, rule_slow())
    try:
        assert torch.equal(_generate_in_model_dtype(pipe, STEPS), moved)
        assert _summary(pipe) == moved_dec
        assert [r.k for r in tcpade.summary(pipe).branches["cond"] if r.computed] == SLOW12
    finally:
        tcpade.remove(pipe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (a CPU-only machine has one device)")
@torch.no_grad()
def test_pipeline_moved_between_devices():
    pipe, _ = _flux()
    tcpade.apply(pipe, rule_slow())
    try:
        cpu_out = _generate_in_model_dtype(pipe, STEPS)
        pipe.to("cuda")
        gpu_out = _generate_in_model_dtype(pipe, STEPS).cpu()
        assert tcpade.runtime(pipe).branches["cond"].history.ring.device.type == "cuda"
        assert [r.k for r in tcpade.summary(pipe).branches["cond"] if r.computed] == SLOW12
        pipe.to("cpu")
        assert torch.equal(_generate_in_model_dtype(pipe, STEPS), cpu_out)
        # fp32 on both (no TF32 by default); the kernels and attention differ in rounding.
        assert ((gpu_out - cpu_out).norm() / cpu_out.norm()).item() < 1e-3
    finally:
        tcpade.remove(pipe)


def test_unsupported_model_error_names_models_and_recipe():
    with pytest.raises(TypeError) as info:
        tcpade.apply(torch.nn.Linear(2, 2))
    msg = str(info.value)
    for name in ("FluxTransformer2DModel", "WanTransformer3DModel", "DiTTransformer2DModel", "SD3Transformer2DModel"):
        assert name in msg
    assert "adapter recipe" in msg and "tcpade/integrations/adapters.py" in msg


class _Answers:
    """A controller that skips its first call with a fixed (wrong) prediction, then computes."""

    def __init__(self, pred):
        self.pred, self.calls = pred, 0

    def decide(self, branch, timestep, force=None):
        self.calls += 1
        return (lambda h_in: self.pred) if self.calls == 1 else None

    def finish(self, branch, h_in, h_out):
        pass


@torch.no_grad()
def test_prediction_on_another_device_or_shape_is_refused():
    """The Runtime's tensors must follow h_in; a controller answering with a tensor on
    another device (or shape) is refused with both named, and the next call is clean."""
    from tcpade.integrations import adapters
    from tcpade.tools.tiny import FAMILIES

    model, inputs, _ = FAMILIES["wan"]()

    def run(kw):
        return model(**kw, return_dict=False)[0]

    ref = run(inputs(0))
    adapters.attach(model, _Answers(torch.zeros(2, 8, 24, device="meta")))
    try:
        with pytest.raises(ValueError, match="meta"):
            run(inputs(0))
        assert torch.equal(run(inputs(0)), ref)
    finally:
        adapters.detach(model)
