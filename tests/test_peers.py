"""bench/peers.py: every peer cache group enables, runs and disables cleanly on the three zoo families
(random weights from ``zoo.build``, a few steps), and the MAC counter counts what really ran.

* after ``disable`` the output equals the never-cached output bit for bit;
* an aggressive knob setting of each group computes less than the full run (compute share < 1);
* a full run counts exactly steps x branches x one transformer call's block MACs, and a diffusers
  hook (FirstBlockCache) on the blocks does not hide the Linears from the counter.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from tcpade import zoo  # noqa: E402

STEPS = 6
SEEDS, LABELS = [0], [1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The test machines share two cores; multi-threaded OpenMP under contention is far slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_MODELS = {}


def _model(name):
    if name not in _MODELS:
        m = zoo.build(name).eval()
        with peers.count_macs(m.transformer) as c:
            base = m.sample(SEEDS, LABELS, STEPS)
        _MODELS[name] = (m, base, c.macs)
    return _MODELS[name]


def _aggressive(name):
    """Per group, the sweep point that skips the most (the last one of the full grid: the grids run
    from light to aggressive)."""
    last = {}
    for meth in peers.peer_methods(name, STEPS):
        last[meth.group] = meth
    return list(last.values())


@pytest.mark.parametrize("name", zoo.names())
def test_every_group_runs_skips_and_restores(name):
    m, base, full = _model(name)
    keys = list(m.transformer.state_dict())
    methods = _aggressive(name)
    groups = {meth.group for meth in methods}
    expected = set(peers.GROUPS) - ({"TaylorSeer (lite)"} if zoo.SPECS[name].family == "dit" else set())
    assert groups == expected
    for meth in methods:
        meth.enable(m, STEPS, SEEDS, LABELS)
        try:
            with peers.count_macs(m.transformer) as c:
                out = m.sample(SEEDS, LABELS, STEPS)
        finally:
            meth.disable(m)
        assert torch.isfinite(out).all(), meth.label
        assert 0 < c.macs < full, (meth.label, c.macs / full)
        after = m.sample(SEEDS, LABELS, STEPS)
        assert torch.equal(after, base), meth.label
        # Nothing left behind: no instance forward or extra submodule (cache-dit's DiT patch adds both).
        assert "forward" not in m.transformer.__dict__, meth.label
        assert list(m.transformer.state_dict()) == keys, meth.label


def test_quick_sweeps_are_small_and_labels_unique():
    for name in zoo.names():
        for steps in (20, 50):
            full, quick = peers.peer_methods(name, steps), peers.peer_methods(name, steps, quick=True)
            assert len(quick) < len(full)
            assert len({x.label for x in full}) == len(full)
            for g in {x.group for x in full}:
                assert 1 <= sum(x.group == g for x in quick) <= 2
                assert 4 <= sum(x.group == g for x in full) <= 10


def test_cachedit_runs_repeat_exactly():
    # cache-dit's context is refreshed at every tcpade.sample run: the same inputs give the same output.
    m, _, _ = _model("flux-digits")
    meth = [x for x in peers.peer_methods("flux-digits", STEPS) if x.group == "cache-dit DBCache"][-1]
    meth.enable(m, STEPS, SEEDS, LABELS)
    try:
        outs = [m.sample(SEEDS, LABELS, STEPS) for _ in range(3)]
    finally:
        meth.disable(m)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("name", zoo.names())
def test_mac_counter_exact(name):
    m, _, full = _model(name)
    branches = 2 if m.spec.guidance_scale != 1 else 1
    t = m.transformer
    # One transformer call, counted on its own, and by hand from the Linear shapes.
    x = m.noise(SEEDS)
    ts = torch.full((1,), 0.5 if m.spec.family == "flux" else 500.0)
    kw = m.conditions(torch.tensor(LABELS))
    seen = {}

    def by_hand(mod, args, out):
        # First call of each Linear: every one runs once in the stack; DiT reuses block 0's norm1.emb
        # after the stack, which the counter must leave out.
        seen.setdefault(id(mod), mod.in_features * mod.out_features * args[0][..., 0].numel())

    handles = [
        mod.register_forward_hook(by_hand)
        for blocks in peers.block_lists(t)
        for mod in blocks.modules()
        if isinstance(mod, torch.nn.Linear)
    ]  # fmt: skip
    with torch.no_grad(), peers.count_macs(t) as one:
        t(hidden_states=x, timestep=ts, return_dict=False, **kw)
    for h in handles:
        h.remove()
    assert one.macs == sum(seen.values()) > 0
    assert full == STEPS * branches * one.macs
    # Every Linear of every block ran once per call (the counter sees all of them).
    n_linear = sum(isinstance(mod, torch.nn.Linear) for b in peers.block_lists(t) for mod in b.modules())
    assert one.calls == n_linear


def test_mac_counter_sees_through_diffusers_hooks():
    # FirstBlockCache wraps the blocks' forward in diffusers' HookRegistry; a threshold of 1e9 skips
    # every block after the first on every step after the first, a threshold of 0 none.
    m, _, full = _model("wan-digits")
    from diffusers import FirstBlockCacheConfig

    for th, expect_less in ((0.0, False), (1e9, True)):
        m.transformer.enable_cache(FirstBlockCacheConfig(threshold=th))
        try:
            with peers.count_macs(m.transformer) as c:
                m.sample(SEEDS, LABELS, STEPS)
        finally:
            m.transformer.disable_cache()
        if expect_less:
            n = len(m.transformer.blocks)
            # steps x branches first blocks, plus the rest of the stack on step 0 of each branch.
            assert c.macs == full // (STEPS * n) * (STEPS + n - 1)
        else:
            assert c.macs == full


def test_mag_calibration_per_branch():
    """MagCache's calibrated ratios are the per-step mean norm ratios of the block-stack residual of each
    CFG branch on its own (cond first), computed here independently from the block inputs / outputs."""
    m, _, _ = _model("wan-digits")
    runs = peers.calibrate_mag_ratios(m, STEPS, SEEDS, LABELS)
    blocks = m.transformer.blocks
    ins, res = [], []
    h1 = blocks[0].register_forward_pre_hook(lambda mod, a, k: ins.append(k.get("hidden_states", a[0] if a else None)),
                                             with_kwargs=True)  # fmt: skip
    h2 = blocks[-1].register_forward_hook(lambda mod, a, o: res.append(o - ins[-1]))
    try:
        m.sample(SEEDS, LABELS, STEPS)
    finally:
        h1.remove()
        h2.remove()
    assert len(runs) == 2
    for b in range(2):
        r = res[b::2]  # calls alternate cond, uncond
        norm = [torch.linalg.norm(x.float(), dim=-1) for x in r]
        want = [1.0] + [(norm[i] / (norm[i - 1] + 1e-8)).mean().item() for i in range(1, STEPS)]
        assert runs[b] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert runs[0] != runs[1]
