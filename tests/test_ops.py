"""The custom ops as torch sees them: schemas, fake kernels, torch.compile, input checks."""

import pytest
import torch
from helpers import gen, randn, smooth_ring

from tcpade import coef as K
from tcpade import ops

TIMES = [0.61, 0.74, 0.93]


def _inputs(device, dtype=torch.float32, shape=(2, 5, 33), nslot=3, seed=0):
    g = gen(seed)
    h_in = randn(shape, dtype, device, g)
    h_out = randn(shape, dtype, device, g)
    ring = smooth_ring(shape, nslot, dtype, device, g)
    slots = torch.tensor([2, 0, 1, 3][:nslot], dtype=torch.int32, device=device)
    prev = randn(shape, dtype, device, g)
    return h_in, h_out, ring, slots, prev


def test_opcheck_update(backend):
    device, _ = backend
    h_in, h_out, ring, slots, prev = _inputs(device)
    for args in [(h_in, h_out, ring, slots, prev, True), (h_in, h_out, ring, slots, None, False),
                 (None, h_out, ring, slots, prev, True), (None, h_out, ring, slots, None, False)]:  # fmt: skip
        torch.library.opcheck(torch.ops.tcpade.update.default, args)


@pytest.mark.parametrize("variant", K.VARIANTS)
def test_opcheck_predict(backend, variant):
    device, _ = backend
    h_in, _, ring, slots, prev = _inputs(device)
    cf = K.coef_tensor(K.build_coef(variant, "middle", TIMES, 0.45, 3, 3), device)
    for store, write_out, p in [(True, True, prev), (False, True, None), (True, False, prev)]:
        torch.library.opcheck(torch.ops.tcpade.predict.default, (h_in, ring, slots, cf, p, variant, store, write_out))
        torch.library.opcheck(torch.ops.tcpade.predict.default, (None, ring, slots, cf, p, variant, store, write_out))


def _clone(*ts):
    return [t.clone() if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_input_is_a_zero_input_bit_for_bit(backend, dtype):
    """h_in=None (the output level) gives the numbers of an all-zero h_in in every backend and
    variant, with and without h_prev, store and write_out: ring, h_prev, h_out and sums."""
    device, name = backend
    h_in, h_out, ring, slots, prev = _inputs(device, dtype)
    zero = torch.zeros_like(h_in)
    with ops.use_backend(name):
        for p in (prev, None):
            r0, p0, r1, p1 = _clone(ring, p, ring, p)
            want = torch.ops.tcpade.update(zero, h_out, r0, slots, p0, True)
            got = torch.ops.tcpade.update(None, h_out, r1, slots, p1, True)
            assert torch.equal(got, want) and torch.equal(r1, r0)
            assert p is None or torch.equal(p1, p0)
            for variant in K.VARIANTS:
                cf = K.coef_tensor(K.build_coef(variant, "late", TIMES, 0.45, 3, 3), device)
                for store, write_out in ((True, True), (False, True), (True, False)):
                    r0, p0, r1, p1 = _clone(ring, p, ring, p)
                    want = torch.ops.tcpade.predict(zero, r0, slots, cf, p0, variant, store, write_out)
                    got = torch.ops.tcpade.predict(None, r1, slots, cf, p1, variant, store, write_out)
                    what = f"{variant} store={store} write_out={write_out} h_prev={p is not None}"
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), what
                    assert torch.equal(r1, r0) and (p is None or torch.equal(p1, p0)), what


def test_no_input_checks_name_the_problem():
    h_in, h_out, ring, slots, prev = _inputs("cpu")
    cf = K.coef_tensor(K.build_coef("linear", "middle", TIMES, 0.45, 3, 3), "cpu")
    with pytest.raises(ValueError, match="h_prev must have shape"):
        ops.update(None, h_out, ring, slots, prev[:1], False)
    with pytest.raises(ValueError, match="ring must have shape"):
        ops.predict(None, ring[:2], slots[:2], cf, None, "linear", False, True)
    with pytest.raises(TypeError, match="h_prev has dtype"):
        ops.predict(None, ring, slots, cf, prev.double(), "linear", False, True)


def _step(h_in, h_out, ring, slots, prev, coef):
    sums = torch.ops.tcpade.update(h_in, h_out, ring, slots, prev, False)
    out, psums = torch.ops.tcpade.predict(h_in, ring, slots, coef, prev, "rational", True, True)
    return out * 2.0, sums + psums


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_no_graph_break(device):
    """Both ops inside one torch.compile(fullgraph=True) region (inductor: C++ on CPU,
    Triton around our Triton kernels on CUDA): the fake kernels give shapes, the real ones
    run, results equal eager."""
    torch._dynamo.reset()
    h_in, h_out, ring, slots, prev = _inputs(device)
    cf = K.coef_tensor(K.build_coef("rational", "middle", TIMES, 0.45, 3, 3), device)
    ring_e, prev_e = ring.clone(), prev.clone()
    want = _step(h_in, h_out, ring_e, slots, prev_e, cf)
    compiled = torch.compile(_step, fullgraph=True, backend="inductor")
    got = compiled(h_in, h_out, ring, slots, prev, cf)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(ring, ring_e)
    torch.testing.assert_close(prev, prev_e)


def test_compile_no_recompile_across_steps(backend):
    """A new step is new tensor values (coef, slots), never a recompile."""
    device, _ = backend
    torch._dynamo.reset()
    h_in, h_out, ring, slots, prev = _inputs(device)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k, t in enumerate([0.45, 0.35, 0.25, 0.15]):
            cf = K.coef_tensor(K.build_coef("rational", K.STAGES[k % 3], TIMES, t, 3, 3), device)
            slots.copy_(slots.roll(1))
            compiled(h_in, h_out, ring, slots, prev, cf)


def test_compile_dynamic_two_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(1, 7, 33), (2, 9, 33)]:
        h_in, h_out, ring, slots, prev = _inputs("cpu", shape=shape)
        cf = K.coef_tensor(K.build_coef("rational", "middle", TIMES, 0.45, 3, 3), "cpu")
        ring_e, prev_e = ring.clone(), prev.clone()
        want = _step(h_in, h_out, ring_e, slots, prev_e, cf)
        got = compiled(h_in, h_out, ring, slots, prev, cf)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(ring, ring_e)


# ------------------------------------------------------------------ bad input, clear errors


@pytest.mark.parametrize("direct", [False, True], ids=["op", "direct"])
def test_errors_name_the_problem(direct):
    """The custom ops and their direct eager calls (``update_direct`` / ``predict_direct`` without
    ``vals``) check the same and raise the same errors."""
    h_in, h_out, ring, slots, prev = _inputs("cpu")
    cf = K.coef_tensor(K.build_coef("paper", "middle", TIMES, 0.45, 3, 3), "cpu")
    update, predict = (ops.update_direct, ops.predict_direct) if direct else (ops.update, ops.predict)
    with pytest.raises(ValueError, match="h_out must have shape"):
        update(h_in, h_out[:, :3], ring, slots, None, False)
    with pytest.raises(TypeError, match="h_out has dtype"):
        update(h_in, h_out.half(), ring, slots, None, False)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        update(h_in.double(), h_out.double(), ring.double(), slots, None, False)
    with pytest.raises(ValueError, match="ring must have shape"):
        update(h_in, h_out, ring[:2], slots[:2], None, False)
    with pytest.raises(ValueError, match="ring must be contiguous"):
        update(h_in, h_out, ring.transpose(2, 3).contiguous().transpose(2, 3), slots, None, False)
    with pytest.raises(ValueError, match="h_prev must be contiguous"):
        update(h_in, h_out, ring, slots, prev.transpose(1, 2).contiguous().transpose(1, 2), False)
    with pytest.raises(ValueError, match="permutation"):
        update(h_in, h_out, ring, torch.tensor([0, 0, 1], dtype=torch.int32), None, False)
    with pytest.raises(ValueError, match="slots must be an int32/int64"):
        update(h_in, h_out, ring, slots.float(), None, False)
    with pytest.raises(ValueError, match="variant must be one of"):
        predict(h_in, ring, slots, cf, None, "pade", False, True)
    with pytest.raises(ValueError, match="coef must be a float32"):
        predict(h_in, ring, slots, cf.double(), None, "paper", False, True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        update(h_in[0, 0], h_out[0, 0], ring[:, 0, 0], slots, None, False)
    with pytest.raises(ValueError, match="meta"):
        update(h_in, h_out.to("meta"), ring, slots, None, False)


def test_noncontiguous_inputs_are_handled(backend):
    """h_in / h_out may be strided views (e.g. image tokens sliced from a joint sequence)."""
    device, _ = backend
    h_in, h_out, ring, slots, prev = _inputs(device, shape=(2, 12, 33))
    wide = torch.cat([h_out, h_out], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    r1, r2 = ring.clone(), ring.clone()
    a = ops.update(h_in, wide, r1, slots, None, False)
    b = ops.update(h_in, wide.contiguous(), r2, slots, None, False)
    assert torch.equal(r1, r2) and torch.equal(a, b)


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cuda"):
            pass


def test_direct_calls_match_the_ops_bit_for_bit(backend):
    """``update_direct`` / ``predict_direct`` (the eager calls that skip torch's custom-op dispatch)
    give the ops' numbers: ring, h_prev, h_out and sums, with and without ``vals`` (the host
    values of slots from a caller that keeps the state), h_in given or None."""
    device, _ = backend
    h_in, h_out, ring, slots, prev = _inputs(device)
    vals = slots.tolist()
    for x in (h_in, None):
        for p in (prev, None):
            for v in (None, vals):
                r0, p0, r1, p1 = _clone(ring, p, ring, p)
                want = ops.update(x, h_out, r0, slots, p0, True)
                got = ops.update_direct(x, h_out, r1, slots, p1, True, v)
                assert torch.equal(got, want) and torch.equal(r1, r0) and (p is None or torch.equal(p1, p0))
                for variant in K.VARIANTS:
                    cf = K.coef_tensor(K.build_coef(variant, "late", TIMES, 0.45, 3, 3), device)
                    for store, write_out in ((True, True), (False, True), (True, False)):
                        r0, p0, r1, p1 = _clone(ring, p, ring, p)
                        want = ops.predict(x, r0, slots, cf, p0, variant, store, write_out)
                        got = ops.predict_direct(x, r1, slots, cf, p1, variant, store, write_out, v)
                        assert all(torch.equal(a, b) for a, b in zip(got, want)), (variant, store, write_out)
                        assert torch.equal(r1, r0) and (p is None or torch.equal(p1, p0))


def test_direct_only_for_plain_eager_calls():
    """``direct``: plain tensors in eager mode only; anything torch's dispatch must see (a mode,
    a subclass, a functorch transform, autograd) goes through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.ones(2, 3)
    assert ops.direct(x, None)
    w = torch.ones(2, 3, requires_grad=True)
    assert not ops.direct(x, w)
    with torch.no_grad():
        assert ops.direct(x, w)
    assert not ops.direct(torch.nn.Parameter(torch.ones(2)))
    with torch.device("cpu"):
        assert not ops.direct(x)
    with FakeTensorMode():
        assert not ops.direct(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(ops.direct(t)) or t)(x)
    assert seen == [False]
    assert torch.compile(lambda t: t + 1 if ops.direct(t) else t - 1, backend="eager", fullgraph=True)(x).eq(0).all()
