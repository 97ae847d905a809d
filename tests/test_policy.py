"""The skip policy and the per-branch runtime, driven by a synthetic block stack.

The "model" here is exact and cheap: the block stack's residual is a smooth rational
function of the schedule's sigma, so predictions can be compared with the truth and the
number of block-stack passes counted directly.
"""

import math
import warnings

import pytest
import torch
from helpers import flow_sigmas

from tcpade.config import TCPadeConfig
from tcpade.policy import Runtime

SHAPE = (1, 16, 24)


def _truth(seed):
    g = torch.Generator().manual_seed(seed)
    a, b, d = (torch.randn(SHAPE, generator=g) for _ in range(3))
    c = 0.5 * torch.rand(*SHAPE[:-1], 1, generator=g)
    data, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    def step(s):
        h_in = data * (1 - s) + noise * s
        # Rational in sigma plus a wiggle no [1/1] rational captures exactly.
        return h_in, (a + b * s) / (1 + c * s) + 0.05 * d * math.sin(6.0 * s)

    return step


def run(cfg, T, branches=("default",), nan_at=None, stop_at=None, rt=None, shape_seed=0, nan_input_at=None):
    rt = rt or Runtime(cfg)
    rt.set_steps(T)
    truths = {br: _truth(shape_seed + i) for i, br in enumerate(branches)}
    passes = {br: 0 for br in branches}
    errors = {br: [] for br in branches}
    outs = {br: [] for br in branches}
    for k, s in enumerate(flow_sigmas(T)):
        if stop_at is not None and k == stop_at:
            break
        for br in branches:
            h_in, r = truths[br](s)
            if nan_input_at is not None and k == nan_input_at:
                h_in = h_in.clone()
                h_in[0, 1, 1] = float("nan")
            pred = rt.begin(br, h_in, torch.tensor([s]))
            if pred is None:
                passes[br] += 1
                h_out = h_in + r
                if nan_at is not None and k == nan_at:
                    h_out = h_out.clone()
                    h_out[0, 3, 4] = float("nan")
                rt.end(br, h_in, h_out)
                outs[br].append(h_out)
            else:
                errors[br].append(((pred - h_in - r).norm() / r.norm()).item())
                outs[br].append(pred)
    return rt, passes, errors, outs


@pytest.mark.parametrize(
    "preset, T, computed",
    [("slow", 20, 9), ("slow", 50, 17), ("fast", 20, 7), ("fast", 50, 15), ("paper", 20, 9), ("paper", 50, 17)],
)
def test_presets_skip_the_expected_share(preset, T, computed):
    cfg = getattr(TCPadeConfig, preset)()
    rt, passes, errors, _ = run(cfg, T)
    assert passes["default"] == computed
    rec = rt.branches["default"].records
    assert [r.k for r in rec] == list(range(T))
    assert sum(r.computed for r in rec) == computed
    assert all(math.isfinite(e) for e in errors["default"])


def test_paper_operating_points_at_20_steps():
    assert 20 / run(TCPadeConfig.slow(), 20)[1]["default"] == pytest.approx(2.22, abs=0.01)
    assert 20 / run(TCPadeConfig.fast(), 20)[1]["default"] == pytest.approx(2.86, abs=0.01)


def test_tsi_threshold_is_monotone():
    counts = [run(TCPadeConfig.slow(tsi_threshold=th), 20)[1]["default"] for th in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 20  # a threshold of 0 blocks every skip


def test_error_policy_tolerance_is_monotone_and_accurate():
    results = []
    for tol in (1e-5, 1e-3, 1e-2, 5e-2, 2e-1):
        cfg = TCPadeConfig(predictor="rational", policy="error", tolerance=tol, warmup=2, max_skips=4)
        _, passes, errors, _ = run(cfg, 20)
        results.append((tol, passes["default"], max(errors["default"], default=0.0)))
    counts = [p for _, p, _ in results]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 20 and counts[-1] <= 10
    # The error actually made on skipped steps stays of the order of the tolerance.
    for tol, _, worst in results:
        assert worst <= 4 * tol


def test_max_skips_caps_runs():
    cfg = TCPadeConfig(predictor="rational", policy="error", tolerance=1.0, warmup=2, max_skips=2)
    rt, _, _, _ = run(cfg, 20)
    flags = [r.computed for r in rt.branches["default"].records]
    longest = max(len(x) for x in "".join("c" if f else "s" for f in flags).split("c"))
    assert longest == 2


@pytest.mark.parametrize("preset", ["paper", "slow"])
def test_nan_forces_full_computation_from_then_on(preset):
    cfg = getattr(TCPadeConfig, preset)()
    rt, passes, _, outs = run(cfg, 20, nan_at=8)
    rec = rt.branches["default"].records
    assert rec[8].computed and rec[8].nonfinite
    assert all(r.computed for r in rec[8:]), "every step after the NaN must be computed"
    assert all(r.reason == "nonfinite" for r in rec[9:-1])
    assert passes["default"] == 6 + 11  # steps 0-4 and 8 computed, then all of 9..19


def test_nonfinite_prediction_is_never_returned():
    """A NaN in the embedded input of a step that would be skipped: the prediction is
    non-finite, so the step is computed instead (the model, not tcpade, owns the NaN)."""
    rt, passes, _, outs = run(TCPadeConfig.slow(), 20, nan_input_at=6)
    rec = rt.branches["default"].records
    assert rec[5].computed is False and rec[6].computed and rec[6].nonfinite and rec[6].reason == "nonfinite"
    assert all(r.computed for r in rec[6:])
    assert all(torch.isfinite(o).all() for k, o in enumerate(outs["default"]) if not rec[k].computed)


def test_branches_never_share_state():
    """cond and uncond follow different trajectories: interleaving them must give each
    exactly what it gets alone. (Sharing one history would mix their residuals.)"""
    cfg = TCPadeConfig.slow()
    _, _, _, both = run(cfg, 20, branches=("cond", "uncond"))
    _, _, _, cond = run(cfg, 20, branches=("cond",))
    _, _, _, uncond = run(cfg, 20, branches=("uncond",), shape_seed=1)
    for a, b in zip(both["cond"], cond["cond"]):
        assert torch.equal(a, b)
    for a, b in zip(both["uncond"], uncond["uncond"]):
        assert torch.equal(a, b)


def test_repeated_runs_identical_and_restart_detected():
    cfg = TCPadeConfig.slow()
    rt = Runtime(cfg)
    _, p1, _, o1 = run(cfg, 20, rt=rt)
    _, p2, _, o2 = run(cfg, 20, rt=rt)
    assert p1 == p2 and all(torch.equal(a, b) for a, b in zip(o1["default"], o2["default"]))
    # A run abandoned at step 7 (say, an exception in the user's loop): the next run's
    # first timestep is recognised as a new run, not as step 7.
    run(cfg, 20, rt=rt, stop_at=7)
    _, p3, _, o3 = run(cfg, 20, rt=rt)
    assert p3 == p1 and all(torch.equal(a, b) for a, b in zip(o1["default"], o3["default"]))


def test_exception_inside_block_stack_resets_branch():
    cfg = TCPadeConfig.slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    step = _truth(0)
    h_in, _ = step(1.0)
    assert rt.begin("default", h_in, 1.0) is None
    # end() never comes (the blocks raised). The next run starts clean.
    _, p, _, _ = run(cfg, 20, rt=rt)
    assert p["default"] == 9


def test_step_count_and_shape_changes_between_runs():
    cfg = TCPadeConfig.fast()
    rt = Runtime(cfg)
    assert run(cfg, 20, rt=rt)[1]["default"] == 7
    assert run(cfg, 50, rt=rt)[1]["default"] == 15
    global SHAPE
    old = SHAPE
    try:
        SHAPE = (2, 9, 40)
        assert run(cfg, 20, rt=rt)[1]["default"] == 7
    finally:
        SHAPE = old


def test_unknown_step_count_computes_everything_with_a_warning():
    rt = Runtime(TCPadeConfig.fast())
    step = _truth(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in flow_sigmas(10):
            h_in, r = step(s)
            assert rt.begin("default", h_in, s) is None
            rt.end("default", h_in, h_in + r)
    assert sum("number of denoising steps is unknown" in str(w.message) for w in caught) == 1


def test_end_without_begin():
    rt = Runtime()
    with pytest.raises(RuntimeError, match="without a matching begin"):
        rt.end("default", torch.zeros(SHAPE), torch.zeros(SHAPE))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(predictor="pade"), "predictor"),
        (dict(policy="teacache"), "policy"),
        (dict(warmup=-1), "warmup"),
        (dict(interval=1.5), "interval"),
        (dict(max_skips=True), "max_skips"),
        (dict(tolerance=0.0), "tolerance"),
        (dict(tolerance=float("inf")), "tolerance"),
        (dict(tsi_threshold=-0.1), "tsi_threshold"),
        (dict(early_frac=0.9), "early_frac"),
        (dict(pole_delta=1.0), "pole_delta"),
        (dict(kappa=-1.0), "kappa"),
        (dict(history_slots=2), "history_slots"),
        (dict(input_correction=float("nan")), "input_correction"),
    ],
)
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"TCPadeConfig\.{field}"):
        TCPadeConfig(**kw)


def test_runtime_rejects_non_config():
    with pytest.raises(TypeError, match="TCPadeConfig"):
        Runtime(config={"predictor": "paper"})


def test_increasing_time_schedule_skips_and_restarts():
    """A schedule whose time grows (t = step index, as some research loops pass it) is one run,
    not a restart at every second call; its time going back down starts a new run."""
    cfg = TCPadeConfig.slow()
    rt = Runtime(cfg)
    rt.set_steps(20)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    for run_index in range(2):
        for k in range(20):
            h_in = a * (1 + 0.01 * k)
            out = rt.begin("default", h_in, float(k))
            if out is None:
                rt.end("default", h_in, h_in + b * (1 + 0.05 * k))
        recs = rt.branches["default"].records
        assert [r.k for r in recs] == list(range(20)), run_index
        assert sum(r.computed for r in recs) == 9, run_index
