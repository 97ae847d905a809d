"""Every supported family, on tiny random-weight models built from configs (tcpade/tools/tiny.py, TINY).

Per family:
* ``test_self_check``: the adapter found the right h_in, h_out and pass-through streams,
  including what runs after the stack: a call skipped with the exact residual of the same call
  (its recorded h_out fed as the prediction) gives the computed call's output bit for bit, and
  no block body runs on it; with hooks that always compute, the output is the unhooked one.
* ``test_fast_run``: 20 steps through the family's diffusers pipeline (or ``tcpade.sample`` where
  none is built) with ``TCPadeConfig.fast()``: each CFG branch computes exactly the passes the
  schedule says (7 of 20), the branches are the pipeline's CFG form, a repeated call gives the
  same output as the first, and after ``remove`` the output is bit-identical to the baseline.

Then the pipeline variants: img2img / inpainting (T = the steps that run), ControlNet residuals
(a call carrying them is computed), Wan2.2's two experts, LoRA, changed steps and resolution.
"""

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade.integrations import adapters  # noqa: E402

from tcpade.tools.tiny import FAMILY_PIPELINES as PIPELINES, TINY  # noqa: E402
from helpers import one_thread, rule_slow  # noqa: E402, F401  (one_thread: autouse, 1 torch thread)

# fast(): a budget of 7 of 20 passes; a random model has no calibrated schedule: the spaced rule.
FAST_20 = [0, 3, 6, 9, 12, 15, 18]



class Oracle:
    """A Controller: computes, and records h_in / h_out; replays given predictions by call index."""

    def __init__(self, predictions=None):
        self.predictions = predictions or {}
        self.calls = 0
        self.begins, self.ends, self.forced = [], [], []

    def decide(self, branch, timestep, force=None):
        self.forced.append(force)
        pred = None if force else self.predictions.get(self.calls)
        self.calls += 1
        if pred is None:
            return None

        def predict(h_in):
            self.begins.append(h_in.clone())
            return pred

        return predict

    def finish(self, branch, h_in, h_out):
        if h_in is not None:
            self.begins.append(h_in.clone())
            self.ends.append(h_out.clone())


def _attention_modules(block):
    return [m for m in block.modules() if "Attention" in type(m).__name__ and m is not block]


class BodyCounter:
    """Counts the attention modules run inside each block: they run only when the block's own
    forward does (a hook on the block itself fires on skipped calls too)."""

    def __init__(self, model):
        self.count = 0
        self.handles = []
        for name, block in adapters.find_adapter(model).stack(model):
            attn = _attention_modules(block)
            assert attn, f"{name} has no attention module to count"
            self.handles += [m.register_forward_pre_hook(self._bump) for m in attn]

    def _bump(self, module, args):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _call(tiny, k):
    return tiny.out(tiny.model(**tiny.inputs(k), return_dict=False))


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_self_check(name):
    tiny = TINY[name]()
    ref = [_call(tiny, k) for k in range(2)]
    rec = Oracle()
    adapters.attach(tiny.model, rec)
    try:
        for k in range(2):
            assert torch.equal(_call(tiny, k), ref[k]), (name, "hooks that compute changed the output")
    finally:
        adapters.detach(tiny.model)
    assert len(rec.ends) == 2 and not torch.equal(rec.begins[0], rec.ends[0])

    oracle = Oracle({k: rec.ends[k] for k in range(2)})
    adapters.attach(tiny.model, oracle)
    counter = BodyCounter(tiny.model)
    try:
        for k in range(2):
            out = _call(tiny, k)
            assert torch.equal(out, ref[k]), (name, k, (out - ref[k]).abs().max().item())
        assert counter.count == 0, f"{name}: {counter.count} attention calls inside skipped blocks"
    finally:
        counter.remove()
        adapters.detach(tiny.model)
    assert oracle.ends == []
    for k in range(2):  # the embeddings before the stack ran as before
        assert torch.equal(oracle.begins[k], rec.begins[k])


def _sample_run(tiny, extra=None):
    """A 20-step tcpade.sample loop with CFG as cond / uncond calls (the prompts of calls 0 and 1);
    ``generate(config=...)`` returns (latents, summary)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kw0, kw1 = tiny.inputs(0), tiny.inputs(1)
    latents = kw0.pop("hidden_states")
    for kw in (kw0, kw1):
        kw.pop("timestep")
        kw.pop("hidden_states", None)
        kw.update(extra or {})

    def generate(steps=20, config=None):
        return tcpade.sample(
            tiny.model, FlowMatchEulerDiscreteScheduler(), latents, kw0, uncond=kw1, guidance_scale=2.0,
            steps=steps, timestep_scale=tiny.timestep_scale, config=config, return_summary=config is not None,
            progress=False,
        )  # fmt: skip

    return tiny.model, generate


# Families run through their pipeline (PIPELINES), the rest through tcpade.sample; the CFG form
# the pipeline uses ("separate": cond / uncond calls, "batched": one call).
RUNS = sorted(set(TINY) | {"flux-kontext", "wan22"})
# The branches each run has: cond / uncond calls in cache contexts unless listed here.
BRANCHES = {
    "sd3": {"default"},  # CFG batched into one call
    "zimage": {"default"},  # CFG batched into one call
    "hidream": {"default"},  # CFG batched into one call
    "flux-kontext": {"default", "default.2"},  # two CFG calls per step without cache contexts
}


@pytest.mark.parametrize("name", RUNS)
@torch.no_grad()
def test_fast_run(name):
    if name in PIPELINES:
        target, generate = PIPELINES[name]()
    else:
        target, generate = _sample_run(TINY[name]())
    ref = generate()
    tcpade.apply(target, tcpade.TCPadeConfig.fast())
    try:
        out = generate()
        s = tcpade.summary(target)
        again = generate()
    finally:
        tcpade.remove(target)
    assert set(s.branches) == BRANCHES.get(name, {"cond", "uncond"})
    for branch, recs in s.branches.items():
        assert len(recs) == 20, (branch, len(recs))
        if name != "wan22":  # two experts: see test_wan22_two_experts
            # the spaced rule on the run's times: the tiny Wan pipeline's scheduler is shifted, so its
            # 7 steps move toward the end; the others' times are even in the step index (or unknown)
            expect = list(tcpade.TCPadeConfig.fast().plan(20, s.times.get(branch)))
            assert s.computed(branch) == expect, (branch, s.computed(branch))
            assert (expect == FAST_20) == (name != "wan"), (name, expect)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # skipped passes were predicted, not computed
    assert torch.equal(again, out)
    assert torch.equal(generate(), ref)
    assert not any(adapters.is_attached(m) for m in _transformers(target))


def _transformers(target):
    if isinstance(target, torch.nn.Module):
        return [target]
    return [m for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None)) if m is not None]


# The TSI rule that slow() was (warm-up steps 0..4, every 4th, the final step, at most 3 skips
# in a row): its "final" step marks the end of the T counted.
SLOW_12 = [0, 1, 2, 3, 4, 8, 11]


@pytest.mark.parametrize("name", ["flux-img2img", "flux-inpaint", "sd3-img2img"])
@torch.no_grad()
def test_img2img_counts_the_steps_that_run(name):
    """Strength 0.6 of 20 steps: the pipeline starts at step 8 of the scheduler's 20 timesteps
    (``set_begin_index``), so T = 12, and the last of them is the final step tcpade computes."""
    pipe, generate = PIPELINES[name]()
    rt = tcpade.apply(pipe, rule_slow())
    try:
        generate(steps=20, strength=0.6)
        assert len(pipe.scheduler.timesteps) == 20 and rt.total_steps() == 12
        s = tcpade.summary(pipe)
    finally:
        tcpade.remove(pipe)
    assert s.branches
    for branch, recs in s.branches.items():
        assert [r.k for r in recs] == list(range(12)), branch
        assert s.computed(branch) == SLOW_12, branch
        assert recs[-1].reason == "final", branch


def _control_run(name):
    """A 20-step tcpade.sample run whose calls all carry block-level ControlNet residuals."""
    tiny = TINY[name]()
    g = torch.Generator().manual_seed(11)
    if name == "flux":  # one residual per double block and per single block: (B, image tokens, width)
        control = dict(controlnet_block_samples=[torch.randn(1, 16, 16, generator=g)],
                       controlnet_single_block_samples=[torch.randn(1, 16, 16, generator=g)])  # fmt: skip
    else:  # sd3: one per block
        control = dict(block_controlnet_hidden_states=[torch.randn(2, 16, 16, generator=g) for _ in range(2)])
    model, generate = _sample_run(tiny, extra=control)
    return model, generate, _sample_run(tiny)[1]


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_controlnet_residuals_are_never_dropped(name):
    """A call that gets ControlNet residuals between blocks is computed (reason "control"):
    skipping it would drop them. The same run without them skips 13 of 20 passes."""
    model, with_control, without = _control_run(name)
    ref = with_control()
    assert not torch.equal(ref, without())  # the residuals matter
    latents, s = with_control(config=tcpade.TCPadeConfig.fast())
    assert torch.equal(latents, ref)
    for branch, recs in s.branches.items():
        assert len(recs) == 20 and all(r.computed and r.reason == "control" for r in recs), branch
    _, s_plain = without(config=tcpade.TCPadeConfig.fast())
    assert all(s_plain.computed(b) == FAST_20 for b in s_plain.branches)


@torch.no_grad()
def test_controlnet_pipeline_is_exact():
    """FluxControlNetPipeline: every transformer call carries the ControlNet's residuals, so every
    call is computed and the output is the baseline's bit for bit."""
    pipe, generate = PIPELINES["flux-controlnet"]()
    ref = generate()
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    try:
        out = generate()
        s = tcpade.summary(pipe)
    finally:
        tcpade.remove(pipe)
    assert torch.equal(out, ref)
    assert set(s.branches) == {"default", "default.2"}  # true CFG as two calls without cache contexts
    for recs in s.branches.values():
        assert len(recs) == 20 and all(r.computed and r.reason == "control" for r in recs)


@torch.no_grad()
def test_wan22_two_experts():
    """Wan2.2: ``transformer`` runs the steps with t >= boundary_ratio * 1000, ``transformer_2``
    the rest. One Runtime for both: the step index, T and the stages run over the whole run; each
    expert keeps its own history per branch, so the low-noise expert starts with none (step k_b
    computed to refill it: the presets' linear predictor needs one residual) and never predicts
    from the other expert's residuals."""
    pipe, generate = PIPELINES["wan22"]()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.append(n))
             for n, m in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))]  # fmt: skip
    rt = tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    try:
        generate()
        s = tcpade.summary(pipe)
    finally:
        tcpade.remove(pipe)
        for h in hooks:
            h.remove()
    k_b = seen.index("transformer_2") // 2  # two CFG calls per step
    assert 0 < k_b < 19 and set(seen[2 * k_b :]) == {"transformer_2"}
    expected = sorted(set(FAST_20) | {k_b})
    for branch in ("cond", "uncond"):
        recs = s.branches[branch]
        assert [r.k for r in recs] == list(range(20))
        assert s.computed(branch) == expected, (branch, k_b, s.computed(branch))
        assert recs[k_b].reason == ("schedule" if k_b in FAST_20 else "history")  # refilled either way
        b = rt.branches[branch]
        assert b.expert == "transformer_2" and b.experts[""].count > 0 and b.history.count > 0


@torch.no_grad()
def test_lora_on_the_transformer():
    """A peft LoRA adapter on the attention projections lives inside the blocks: the self-check
    and a tcpade run behave as without it, and the adapter's effect is kept."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    tiny = TINY["flux"]()
    plain = _call(tiny, 0)
    tiny.model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                      init_lora_weights=False))  # fmt: skip
    ref = _call(tiny, 0)
    assert not torch.equal(ref, plain)
    rec = Oracle()
    adapters.attach(tiny.model, rec)
    try:
        assert torch.equal(_call(tiny, 0), ref)
    finally:
        adapters.detach(tiny.model)
    adapters.attach(tiny.model, Oracle({0: rec.ends[0]}))
    try:
        assert torch.equal(_call(tiny, 0), ref)
    finally:
        adapters.detach(tiny.model)
    model, generate = _sample_run(tiny)
    base = generate()
    latents, s = generate(config=tcpade.TCPadeConfig.fast())
    assert all(s.computed(b) == FAST_20 for b in ("cond", "uncond")) and not torch.equal(latents, base)
    assert torch.equal(generate(), base)


@torch.no_grad()
def test_steps_and_resolution_change_between_calls():
    """Each pipeline call is its own run: T from that call's scheduler, buffers for its shape."""
    pipe, generate = PIPELINES["flux"]()
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())
    try:
        first = generate(steps=20, size=8)
        small = generate(steps=10, size=16)
        s = tcpade.summary(pipe)
        again = generate(steps=20, size=8)
    finally:
        tcpade.remove(pipe)
    assert small.shape[1] == 4 * first.shape[1]  # 4x the image tokens
    for branch in ("cond", "uncond"):
        assert [r.k for r in s.branches[branch]] == list(range(10))
        assert s.computed(branch) == [0, 4, 8]  # fast() at 10 steps: 3 passes (at most 3 skips in a row)
    assert torch.equal(again, first)
