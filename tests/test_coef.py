"""The coefficient vector: layout shared with the kernels, stages, bad values."""

import importlib
import struct

import pytest

from tcpade import coef as K
from tcpade.core import layout as L


def test_kernel_constants_come_from_the_tables():
    """The Triton kernels' compile-time constants are the tables' values (they are read from
    tcpade.core.layout / tcpade.core.coef at import: this guards the reading, not a copy)."""
    pytest.importorskip("triton")
    P = importlib.import_module("tcpade.kernels.predict")
    C = importlib.import_module("tcpade.kernels._common")
    for name in ("W_MAIN", "C1", "C2", "GAMMA", "LAM1", "LAM2", "ALP0", "ALP1", "ALP2", "TAU0", "TAU1", "TAU2",
                 "BMAX", "KAPPA", "WAVG"):  # fmt: skip
        assert getattr(P, name).value == getattr(K, name), name
    for v in L.VARIANT_TABLE.values():
        assert getattr(P, v.name.upper()).value == v.code, v.name
    for name in ("s_rate", "s_eps", "num_r1", "den_a", "den_min", "avg_r1", "avg_r2", "trust_d", "trust_mag",
                 "beta_s", "beta_0", "fb1"):  # fmt: skip
        assert getattr(P, "P_" + name.upper()).value == getattr(L.PAPER, name), name
    assert C.NSUMS == L.NSUMS and C.SUMS_PAD.value >= L.NSUMS
    for name in L.SUMS:
        assert getattr(C, "S_" + name.upper()).value == L.SUMS.index(name), name


def test_native_was_built_from_these_tables():
    """The extension's compiled-in tables equal tcpade.core.layout's (a stale build fails here)."""
    from tcpade import ops

    if not ops.native_available():
        pytest.skip("C++ extension not built")
    assert ops._native.layout() == L.compiled_layout()


def test_c_header_states_every_table_entry():
    text = L.c_header()
    assert f"constexpr int NSUMS = {L.NSUMS};" in text and f"constexpr int NCOEF = {L.NCOEF};" in text
    for i, n in enumerate(L.COEF):
        assert f"constexpr int CF_{n.upper()} = {i};" in text
    # Constants are the float32 rounding of the Python values, as hex (no second rounding).
    assert "constexpr float PAPER_AVG_R1 = 0x1.3333340000000p-1f;" in text
    assert struct.unpack("f", struct.pack("f", L.PAPER.avg_r1))[0] == float.fromhex("0x1.3333340000000p-1")


def test_variant_table_is_what_callers_read():
    assert K.VARIANTS == tuple(L.VARIANT_TABLE) == ("paper", "rational", "reuse", "linear")
    for v in L.VARIANT_TABLE.values():
        assert K.check_variant(v.name) == v.code
        assert K.MIN_HISTORY[v.name] == v.min_history
        assert K.default_gamma(v.name) == v.gamma
        c = K.build_coef(v.name, "late", [0.5, 0.6, 0.7], 0.4, 3, 3)
        assert (c[K.W_MAIN], c[K.C1], c[K.C2]) == v.stage_weights["late"] and c[K.GAMMA] == v.gamma
    assert K.default_gamma("paper") == L.PAPER.gamma == 0.2
    with pytest.raises(ValueError, match="variant must be one of"):
        K.check_variant("pade")


@pytest.mark.parametrize("T", [20, 50, 7])
def test_stage_boundaries_scale_with_T(T):
    stages = [K.stage_of(k, T) for k in range(T)]
    assert stages == ["early" if k <= 0.3 * T else "late" if k > 0.8 * T else "middle" for k in range(T)]
    assert stages[0] == "early" and stages[-1] == "late"


def test_stage_20_matches_published_code():
    # The published code hard-wires T = 20: early k <= 6, late k > 16.
    stages = [K.stage_of(k, 20) for k in range(20)]
    assert stages.count("early") == 7 and stages.count("late") == 3


def test_wavg_renormalised_to_history():
    c = K.build_coef("paper", "middle", [0.5, 0.6, 0.7], 0.4, 2, 4)
    assert c[K.WAVG : K.WAVG + 4] == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0])
    c = K.build_coef("paper", "middle", [0.5, 0.6, 0.7], 0.4, 4, 4)
    assert c[K.WAVG : K.WAVG + 4] == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_paper_has_no_curvature_flag():
    # The published test compares the TSI (<= 1) with 1.4: it always passes, so c = 1 and
    # the coefficients carry no flag.
    args = dict(variant="paper", stage="middle", times=[0.5, 0.6, 0.7], t_target=0.4, count=3, nslots=3)
    with pytest.raises(TypeError):
        K.build_coef(**args, pade_c=1.0)
    assert not hasattr(K, "paper_curvature_flag")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(variant="pade"), "variant must be one of"),
        (dict(stage="mid"), "stage must be one of"),
        (dict(delta=1.0), "delta must be in"),
        (dict(kappa=-1.0), "kappa must be >= 0"),
        (dict(nslots=2), "nslots must be >= 3"),
    ],
)
def test_bad_values_raise(kw, match):
    args = dict(variant="paper", stage="middle", times=[0.5, 0.6, 0.7], t_target=0.4, count=3, nslots=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        K.build_coef(**args)


def test_stage_of_rejects_bad_total():
    with pytest.raises(ValueError, match="total steps must be > 0"):
        K.stage_of(0, 0)
