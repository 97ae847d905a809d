"""bench/peers.py: every peer cache group enables, runs and disables cleanly on the three zoo families
(random weights from ``zoo.build``, a few steps), and the MAC counter counts what really ran.

* after ``disable`` the output equals the never-cached output bit for bit;
* an aggressive knob setting of each group computes less than the full run (compute share < 1);
* a full run counts exactly steps x branches x one transformer call's block MACs, and a diffusers
  hook (FirstBlockCache) on the blocks does not hide the Linears from the counter.
"""

import peers
import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

from tcpade import zoo

STEPS = 6
SEEDS, LABELS = [0], [1]

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
    if zoo.SPECS[name].family != "wan":  # SeaCache's built-in adapters: Wan (and Cosmos 3) only
        expected.discard("SeaCache")
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
        # Nothing left behind: no instance forward or extra submodule (cache-dit's DiT patch adds both), no
        # diffusers hook on the transformer or any of its modules, no cache config.
        assert "forward" not in m.transformer.__dict__, meth.label
        assert list(m.transformer.state_dict()) == keys, meth.label
        assert getattr(m.transformer, "_cache_config", None) is None, meth.label
        for mod_name, mod in m.transformer.named_modules():
            reg = getattr(mod, "_diffusers_hook", None)
            assert reg is None or not reg.hooks, (meth.label, mod_name, list(reg.hooks))


def test_quick_sweeps_are_small_and_labels_unique():
    for name in zoo.names():
        for steps in (10, 20, 28, 50):
            full, quick = peers.peer_methods(name, steps), peers.peer_methods(name, steps, quick=True)
            assert len(quick) < len(full)
            assert len({x.label for x in full}) == len(full)
            for g in {x.group for x in full}:
                assert 1 <= sum(x.group == g for x in quick) <= 2
                # (TaylorSeer whole-block and lite: the scaled warm-ups and the short ones)
                most = 15 if g in ("TaylorSeer (whole-block)", "TaylorSeer (lite)") else 10
                assert 3 <= sum(x.group == g for x in full) <= most


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


@pytest.mark.parametrize("steps", [10, 20, 28, 50])
def test_evenly_spaced_masks_hit_their_pass_counts(steps):
    for name in zoo.names():
        counts = peers.mask_pass_counts(name, steps)
        assert counts == sorted(set(counts), reverse=True) and all(3 <= p < steps for p in counts)
        # the pass counts the benchmark compares at are in the grid (those of 3 passes or more)
        assert {p for p in peers.level_passes(steps) if p >= 3} <= set(counts)
    for passes in range(1, steps + 1):
        for warmup in (0, 1, 2, 3):
            mask = peers.evenly_spaced_mask(steps, passes, warmup)
            assert len(mask) == steps and sum(mask) == passes and set(mask) <= {0, 1}
            assert mask[: min(warmup, passes)] == [1] * min(warmup, passes)
            ones = [i for i, x in enumerate(mask) if x]
            gaps = [b - a for a, b in zip(ones[min(warmup, passes) :], ones[min(warmup, passes) + 1 :])]
            assert not gaps or max(gaps) - min(gaps) <= 1, (passes, warmup, mask)  # evenly spaced
    with pytest.raises(ValueError, match="passes"):
        peers.evenly_spaced_mask(steps, 0)
    with pytest.raises(ValueError, match="passes"):
        peers.evenly_spaced_mask(steps, steps + 1)


def test_level_passes():
    assert peers.level_passes(20) == [10, 8, 7]
    assert peers.level_passes(50) == [25, 20, 17, 16, 12]
    assert [t for _, t in peers.levels(50)] == ["2x", "2.5x", "2.9x", "3x", "4x"]
    assert peers.level_passes(10) == [5, 4, 3] and peers.level_passes(28) == [14, 11, 9]


def test_cachedit_mask_computes_exactly_the_masked_steps():
    """An arbitrary mask (a schedule given as step indices): the masked-in steps run every block, the others
    only the first block of each list, counted exactly; the output differs from the full run's and the
    model is restored afterwards."""
    m, base, full = _model("wan-digits")
    with peers.count_macs(m.transformer, first_only=True) as c:
        m.sample(SEEDS, LABELS, STEPS)
    first_per_step, per_step = c.macs // STEPS, full // STEPS
    assert 0 < first_per_step < per_step and c.macs == STEPS * first_per_step
    computed = [0, 1, 3]  # not evenly spaced
    mask = peers.mask_from_steps(computed, STEPS)
    assert mask == [1, 1, 0, 1, 0, 0]
    for cal in peers.MASK_CALIBRATORS:
        meth = peers.cachedit_mask(mask, cal)
        assert meth.label.startswith("mask 3/6 w=2")
        meth.enable(m, STEPS, SEEDS, LABELS)
        try:
            with peers.count_macs(m.transformer) as run:
                out = m.sample(SEEDS, LABELS, STEPS)
        finally:
            meth.disable(m)
        assert run.macs == len(computed) * per_step + (STEPS - len(computed)) * first_per_step, meth.label
        assert torch.isfinite(out).all() and not torch.equal(out, base), meth.label
        assert torch.equal(m.sample(SEEDS, LABELS, STEPS), base), meth.label
    share = peers.first_block_share("wan-digits")
    assert share == pytest.approx(first_per_step / per_step, rel=1e-12)


def test_cachedit_mask_bad_input():
    with pytest.raises(ValueError, match="mask"):
        peers.cachedit_mask([0, 1, 1])  # step 0 must be computed
    with pytest.raises(ValueError, match="mask"):
        peers.cachedit_mask([1, 2, 0])
    with pytest.raises(ValueError, match="mask"):
        peers.cachedit_mask([])
    with pytest.raises(ValueError, match="computed steps"):
        peers.mask_from_steps([0, 6], 6)
    for bad in (("nope",), ("dmd",), ("taylorseer", 0), "foca"):
        with pytest.raises(ValueError, match="calibrator"):
            peers.cachedit_mask([1, 0], bad)
    m = _model("wan-digits")[0]
    meth = peers.cachedit_mask([1, 1, 0, 1])
    with pytest.raises(ValueError, match="4 entries for a 6-step run"):
        meth.enable(m, STEPS, SEEDS, LABELS)
    meth.disable(m)  # nothing was applied: a no-op
    assert torch.equal(m.sample(SEEDS, LABELS, STEPS), _model("wan-digits")[1])


def test_seacache_only_where_it_runs():
    for name in zoo.names():
        groups = {x.group for x in peers.peer_methods(name, 20)}
        assert ("SeaCache" in groups) == (zoo.SPECS[name].family == "wan"), name


@pytest.mark.parametrize("steps", [20, 28, 50])
def test_taylorseer_sweep_has_short_warm_ups_at_every_step_count(steps):
    """TaylorSeer's strongest settings at 20 and 50 steps have a warm-up of 1 or 2 steps (diffusers
    computes step k when k < w or (k - w - 1) % N == 0): the sweep has them at every step count, not
    only the warm-ups scaled with the run, and at each level up to 2.9x one of them reaches it."""
    for mode in ("whole-block", "lite"):
        grid = [m.knobs for m in peers.peer_methods("flux-digits", steps) if m.group == f"TaylorSeer ({mode})"]
        short = [k for k in grid if k["disable_cache_before_step"] <= 2 and k["max_order"] == 1]
        assert {(k["cache_interval"], k["disable_cache_before_step"]) for k in short} >= {(3, 1), (3, 2), (4, 1)}
        for level, _ in peers.levels(steps)[:3]:
            passes = [sum(1 for s in range(steps) if s < k["disable_cache_before_step"]
                          or (s - k["disable_cache_before_step"] - 1) % k["cache_interval"] == 0) for k in short]
            assert any(steps / p >= level * (1 - 1e-3) for p in passes), (mode, steps, level, passes)
