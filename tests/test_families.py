"""Every supported family, on tiny random-weight models built from configs (tests/families.py).

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
from tcpade import adapters  # noqa: E402

from families import PIPELINES, TINY  # noqa: E402

# fast(): warm-up steps 0..2, then every 4th step (final_steps=0): 7 of 20.
FAST_20 = [0, 1, 2, 4, 8, 12, 16]


class Oracle:
    """A Controller: computes, and records h_in / h_out; replays given predictions by call index."""

    def __init__(self, predictions=None):
        self.predictions = predictions or {}
        self.calls = 0
        self.begins, self.ends, self.forced = [], [], []

    def begin(self, branch, h_in, timestep, force=None):
        self.begins.append(h_in.clone())
        self.forced.append(force)
        pred = None if force else self.predictions.get(self.calls)
        self.calls += 1
        return pred

    def end(self, branch, h_in, h_out):
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


def _sample_run(tiny):
    """A 20-step tcpade.sample loop with CFG as cond / uncond calls (the prompts of calls 0 and 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kw0, kw1 = tiny.inputs(0), tiny.inputs(1)
    latents = kw0.pop("hidden_states")
    for kw in (kw0, kw1):
        kw.pop("timestep")
        kw.pop("hidden_states", None)

    def generate(steps=20):
        return tcpade.sample(
            tiny.model, FlowMatchEulerDiscreteScheduler(), latents, kw0, uncond=kw1, guidance_scale=2.0,
            steps=steps, timestep_scale=tiny.timestep_scale,
        )  # fmt: skip

    return tiny.model, generate


# Families run through their pipeline (PIPELINES), the rest through tcpade.sample; the CFG form
# the pipeline uses ("separate": cond / uncond calls, "batched": one call).
RUNS = sorted(set(TINY) | {"flux-kontext", "wan22"})
BATCHED = {"sd3"}  # pipelines that batch cond and uncond into one call


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
    assert set(s.branches) == ({"default"} if name in BATCHED else {"cond", "uncond"})
    for branch, recs in s.branches.items():
        assert len(recs) == 20, (branch, len(recs))
        if name != "wan22":  # two experts: see test_wan22_two_experts
            assert s.computed(branch) == FAST_20, (branch, s.computed(branch))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # skipped passes were predicted, not computed
    assert torch.equal(again, out)
    assert torch.equal(generate(), ref)
    assert not any(adapters.is_attached(m) for m in _transformers(target))


def _transformers(target):
    if isinstance(target, torch.nn.Module):
        return [target]
    return [m for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None)) if m is not None]
