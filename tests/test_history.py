"""The per-branch residual history: ring rotation, reallocation, reset, bytes, the
device-side fallback of a non-finite prediction, the sums by name."""

import contextlib
import math

import pytest
import torch
from helpers import gen, randn

from tcpade import History, reference
from tcpade import coef as K
from tcpade.core.history import Sums, SumValues


def test_ring_rotation_and_times(backend):
    device, _ = backend
    g = gen(1)
    hist = History(nslots=3)
    shape = (1, 6, 20)
    residuals = []
    for k, t in enumerate([1.0, 0.9, 0.75, 0.6, 0.5]):
        h_in = randn(shape, torch.float32, device, g)
        r = randn(shape, torch.float32, device, g)
        sums = hist.record(h_in, h_in + r)
        hist.advance(t, wrote=True)
        residuals.append((h_in + r) - h_in)
        assert hist.count == min(k + 1, 3)
        assert hist.times[: hist.count] == [1.0, 0.9, 0.75, 0.6, 0.5][k::-1][: hist.count]
        # R1, R2, R3 are the newest residuals, in order of age.
        for age in range(hist.count):
            assert torch.equal(hist.ring[hist.order[age]], residuals[-1 - age])
        assert hist.slots.tolist() == hist.order
        if k >= 2:
            d1 = (residuals[-2] - residuals[-3]).double()
            d2 = (residuals[-1] - residuals[-2]).double()
            direct = 0.5 * (d1 / d1.norm() - d2 / d2.norm()).norm().item()
            assert abs(hist_tsi(sums) - direct) < 1e-5


def hist_tsi(sums):
    return reference.tsi_from_sums(sums.tolist())


def test_reallocates_on_shape_dtype_change_and_reports_bytes():
    hist = History(nslots=3, keep_prev_input=True)
    h = torch.zeros(2, 5, 8)
    assert hist.ensure(h) and hist.nbytes == (3 + 1) * h.numel() * 4 + 3 * 4
    hist.record(h, h + 1)
    hist.advance(0.9, wrote=True)
    ring = hist.ring
    assert not hist.ensure(torch.ones(2, 5, 8))  # same key: nothing reallocated
    assert hist.ring is ring and hist.count == 1
    assert hist.ensure(torch.zeros(1, 7, 8))  # new shape: fresh, empty history
    assert hist.count == 0 and hist.ring.shape == (3, 1, 7, 8)
    assert hist.ensure(torch.zeros(1, 7, 8, dtype=torch.bfloat16))
    assert hist.nbytes == 4 * 7 * 8 * 2 + 3 * 4


def test_reset_keeps_buffers():
    hist = History(nslots=4)
    h = torch.zeros(1, 3, 8)
    for t in (1.0, 0.8):
        hist.record(h, h + t)
        hist.advance(t, wrote=True)
    ring = hist.ring
    hist.reset()
    assert hist.ring is ring and hist.count == 0 and all(math.isnan(t) for t in hist.times)
    assert hist.slots.tolist() == [0, 1, 2, 3]


def test_bad_nslots():
    with pytest.raises(ValueError, match="nslots must be an int >= 3"):
        History(nslots=2)


def test_predict_needs_history():
    hist = History()
    h = torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match="before any record"):
        hist.predict(h, torch.zeros(K.NCOEF), "paper")


@pytest.mark.parametrize("store", [False, True])
def test_nonfinite_prediction_falls_back_to_h_in_plus_r1(backend, store):
    """fp16 residuals of +-60000: the linear extrapolation 2 R1 - R2 overflows where they are
    large. Those elements become h_in + R1 (and R1 where the prediction is stored), the op counts
    them in ``nonfinite``; everything else is the op's own prediction."""
    device, _ = backend
    g = gen(11)
    shape = (1, 5, 33)
    hist = History(nslots=3)
    h_in = randn(shape, torch.float16, device, g)
    r2 = randn(shape, torch.float16, device, g)
    r1 = randn(shape, torch.float16, device, g)
    big = torch.zeros(shape, dtype=torch.bool, device=device)
    big[0, 1, 3] = big[0, 4, 32] = True
    r2[big], r1[big] = -30000.0, 30000.0
    for t, r in ((1.0, r2), (0.9, r1)):
        hist.record(h_in, h_in + r)
        hist.advance(t, wrote=True)
    r1 = hist.ring[hist.order[0]].clone()  # as stored (fp16 rounding of h_out - h_in)
    cf = hist.coef("linear", "middle", 0.8)
    ring_before = hist.ring.clone()
    out, sums = hist.predict(h_in, cf, "linear", store=store)
    ref, _ = reference.predict(h_in.double().cpu(), ring_before.double().cpu(), hist.slots.cpu(), cf.cpu(), None,
                               "linear", store, True, torch.float64)  # fmt: skip
    assert torch.isfinite(out).all()
    assert torch.equal(out[big], (h_in + r1)[big])
    assert (out[~big].double().cpu() - ref[~big]).abs().max() < 2e-2  # fp16 storage
    v = SumValues(*sums.tolist())
    read = Sums(sums)
    assert read.ready() and not read.read  # CPU sums are host memory: ready, not yet read
    assert v.nonfinite == 2 and read.get() == v and read.read
    # The reduction hook runs on the device sums before they are read.
    assert Sums(sums, reduce=lambda x: 2 * x).get().nonfinite == 4
    if store:
        stored = hist.ring[hist.order[-1]]
        assert torch.equal(stored[big], r1[big]) and torch.isfinite(stored).all()


@pytest.mark.parametrize("variant", K.VARIANTS)
def test_sequence_matches_reference_loop(backend, variant):
    """A computed/skipped/probed sequence through History equals the same steps done by
    hand with the float64 reference (the paper's history rule: predictions are stored)."""
    device, _ = backend
    g = gen(5)
    shape = (1, 4, 24)
    hist = History(nslots=3, keep_prev_input=True)
    times = [1.0, 0.92, 0.8, 0.66, 0.5, 0.36, 0.2]
    plan = ["compute", "compute", "compute", "skip", "probe", "skip", "compute"]
    ref_ring = torch.zeros((3, *shape), dtype=torch.float64)
    order = [0, 1, 2]
    ref_times = [math.nan] * 3
    ref_prev = torch.zeros(shape, dtype=torch.float64)
    count = 0
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    for k, (t, what) in enumerate(zip(times, plan)):
        h_in64 = base * (1 + 0.1 * k) + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        h_in = h_in64.float().to(device)
        h_in64 = h_in.cpu().double()
        stage = K.stage_of(k, len(times))
        slots = torch.tensor(order, dtype=torch.int32)
        if what == "compute":
            h_out = (h_in64 + torch.sin(h_in64 * (k + 1))).float().to(device)
            hist.record(h_in, h_out)
            hist.advance(t, wrote=True)
            reference.update(h_in64, h_out.cpu().double(), ref_ring, slots, ref_prev, False, torch.float64)
            order = [order[-1]] + order[:-1]
            ref_times = [t] + ref_times[:-1]
            count = min(count + 1, 3)
            continue
        cfv = hist.coef(variant, stage, t)
        cf_ref = K.build_coef(variant, stage, ref_times, t, count, 3, gamma=None)
        assert cfv.tolist() == torch.tensor(cf_ref, dtype=torch.float32).tolist()
        probe = what == "probe"
        out, _ = hist.predict(h_in, cfv, variant, store=not probe, probe=probe)
        hist.advance(t, wrote=not probe)
        ref_out, _ = reference.predict(
            h_in64,
            ref_ring,
            slots,
            torch.tensor(cf_ref, dtype=torch.float64),
            ref_prev,
            variant,
            True,
            True,
            torch.float64,
        )
        assert (out.cpu().double() - ref_out).abs().max().item() < 1e-4
        if not probe:
            order = [order[-1]] + order[:-1]
            ref_times = [t] + ref_times[:-1]
            count = min(count + 1, 3)
        assert hist.order == order and hist.count == count
    for age in range(3):
        assert (hist.ring[hist.order[age]].cpu().double() - ref_ring[order[age]]).abs().max().item() < 1e-4


def test_output_level_history_reads_and_keeps_no_input():
    """h_in=None (output level): R = h_out, no h_prev kept (the input is zero, so the input-change
    correction is 0), only the ring allocated."""
    out = torch.randn(2, 5, 8)
    hist = History(nslots=3, keep_prev_input=True)
    with pytest.raises(RuntimeError, match="before any record"):
        hist.predict(None, torch.zeros(K.NCOEF), "reuse")
    hist.record(None, out)
    hist.advance(0.9, wrote=True)
    assert hist.output and hist.h_prev is None and not hist.has_prev
    assert hist.nbytes == 3 * out.numel() * 4 + 3 * 4
    assert torch.equal(hist.ring[hist.order[0]], out)
    hist.record(None, out * 2)  # nothing reallocated
    hist.advance(0.8, wrote=True)
    assert hist.count == 2 and torch.equal(hist.ring[hist.order[0]], out * 2)
    cf = hist.coef("reuse", "middle", 0.7)
    got, _ = hist.predict(None, cf, "reuse")
    assert torch.equal(got, out * 2)
    assert hist.coef_values("paper", "middle", 0.7)[K.GAMMA] == 0.0
    assert hist.ensure(out, output=False) and hist.h_prev is not None and hist.count == 0  # a block-level input


class _ThroughOps(torch.overrides.TorchFunctionMode):
    """Any torch function mode sends History to the custom ops (as torch.compile does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep_prev", [False, True])
def test_eager_calls_match_the_custom_ops(backend, keep_prev):
    """Eager History calls skip torch's custom-op dispatch (and, once a state has passed the
    checks, the checks): the same ring, slots, h_out and sums as through the ops, for computed,
    stored, probed and output-level steps, and fp16 predictions that overflow (stored as R1)."""
    device, _ = backend
    g = gen(3)
    shape = (1, 5, 16)
    h_in = randn(shape, torch.float16, device, g)
    res = [randn(shape, torch.float16, device, g) for _ in range(4)]
    res[2][0, 1, 3], res[3][0, 1, 3] = -30000.0, 30000.0  # 2 R1 - R2 overflows there
    fast, slow = History(nslots=4, keep_prev_input=keep_prev), History(nslots=4, keep_prev_input=keep_prev)
    steps = [("record", r) for r in res] + [("store", None), ("probe", res[0]), ("skip", None), ("store", None)]
    for k, (what, r) in enumerate(steps):
        t = 1.0 - 0.1 * k
        got = []
        for hist in (fast, slow):
            with _ThroughOps() if hist is slow else contextlib.nullcontext():
                if what == "record":
                    out, sums = None, hist.record(h_in, h_in + r)
                else:
                    cf = hist.coef("linear", "middle", t)
                    out, sums = hist.predict(h_in, cf, "linear", store=what == "store", probe=what == "probe")
                    if what == "probe":
                        sums = torch.cat([sums, hist.record(h_in, h_in + r, probe=True)])
                hist.advance(t, wrote=what in ("record", "store", "probe"))
            got.append((out, sums, hist.ring.clone(), hist.slots.tolist(), hist.order))
        (o1, s1, r1, sl1, or1), (o2, s2, r2, sl2, or2) = got
        assert (o1 is None and o2 is None) or torch.equal(o1, o2), (k, what)
        assert torch.equal(s1, s2) and torch.equal(r1, r2) and sl1 == sl2 == or1 == or2, (k, what)
    assert fast._checked is not None and slow._checked is None  # the eager one checked its state once
    assert torch.isfinite(fast.ring).all()
    out = randn(shape, torch.float16, device, g)
    for hist in (fast, slow):  # output level: a new state, checked again
        with _ThroughOps() if hist is slow else contextlib.nullcontext():
            hist.record(None, out)
            hist.advance(0.1, wrote=True)
            got.append(hist.predict(None, hist.coef("reuse", "middle", 0.05), "reuse"))
    assert all(torch.equal(a, b) for a, b in zip(got[-1], got[-2]))


def test_checks_once_per_state_keep_every_error():
    """A state (ring, slots, h_prev) is checked whole by its first eager call; later calls check what
    can change per call (h_out against h_in, coef, variant) with the ops' errors, and a new shape,
    dtype, ring or slots is checked again."""
    g = gen(4)
    hist = History(nslots=3, keep_prev_input=True)
    x = torch.randn(1, 4, 8, generator=g)
    hist.record(x, x + 1)
    hist.advance(1.0, wrote=True)
    state = (hist.ring, hist.slots, hist.h_prev)
    assert hist._checked == state
    with pytest.raises(ValueError, match="h_out must have shape"):
        hist.record(x, x[:, :3])
    with pytest.raises(TypeError, match="h_out has dtype"):
        hist.record(x, x.half())
    cf = hist.coef("reuse", "middle", 0.9)
    with pytest.raises(ValueError, match="coef must be a float32"):
        hist.predict(x, cf.double(), "reuse")
    with pytest.raises(ValueError, match="variant must be one of"):
        hist.predict(x, cf, "pade")
    for _ in range(2):  # a new dtype reallocates; the new state fails its check every time
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            hist.record(x.double(), x.double())
    with pytest.raises(ValueError, match="at least 2 dims"):
        hist.record(x[0, 0], x[0, 0])
    hist.record(x, x + 2)  # back to the first layout: a new ring, checked again
    assert hist._checked[0] is hist.ring and hist.ring is not state[0]
    hist.slots = torch.tensor([0, 0, 1], dtype=torch.int32)  # slots not from History: checked again
    with pytest.raises(ValueError, match="permutation"):
        hist.record(x, x)
    hist.slots = torch.tensor([1, 2, 0], dtype=torch.int32)  # a permutation, but not what order mirrors
    hist.record(x, x)
    assert hist._checked[1] is not hist.slots  # not trusted: the op keeps reading slots


def test_advance_rolls_slots_like_order():
    """advance copies one of the precomputed rotations into slots (nothing allocated): slots stays
    the device mirror of order, from allocation and after a reset, for every ring size."""
    for nslots in (3, 4, 5):
        hist = History(nslots=nslots)
        x = torch.zeros(1, 2, 4)
        for k in range(2 * nslots + 1):
            hist.record(x, x + k)
            hist.advance(1.0 - 0.01 * k, wrote=k % 3 != 2)
            assert hist.slots.tolist() == hist.order
            if k == nslots:
                hist.reset()
                assert hist.slots.tolist() == hist.order == list(range(nslots))
