"""The coefficient vector: layout shared with the kernels, stages, bad values."""

import importlib

import pytest

from tcpade import coef as K


def test_kernel_indices_match_layout():
    pytest.importorskip("triton")
    P = importlib.import_module("tcpade.kernels.predict")

    for name in [
        "W_MAIN",
        "C1",
        "C2",
        "GAMMA",
        "LAM1",
        "LAM2",
        "ALP0",
        "ALP1",
        "ALP2",
        "TAU0",
        "TAU1",
        "TAU2",
        "BMAX",
        "KAPPA",
        "MU",
        "PADE_C",
        "WAVG",
    ]:
        assert getattr(P, name).value == getattr(K, name), name
    assert P.VARIANT_IDS == {v: i for i, v in enumerate(K.VARIANTS)}


def test_native_indices_match_layout():
    from tcpade import ops

    if not ops.native_available():
        pytest.skip("C++ extension not built")
    assert ops._native.coef_layout() == {
        "W_MAIN": K.W_MAIN,
        "C1": K.C1,
        "C2": K.C2,
        "GAMMA": K.GAMMA,
        "LAM1": K.LAM1,
        "LAM2": K.LAM2,
        "ALP0": K.ALP0,
        "ALP1": K.ALP1,
        "ALP2": K.ALP2,
        "TAU0": K.TAU0,
        "TAU1": K.TAU1,
        "TAU2": K.TAU2,
        "BMAX": K.BMAX,
        "KAPPA": K.KAPPA,
        "MU": K.MU,
        "PADE_C": K.PADE_C,
        "WAVG": K.WAVG,
        "NCOEF": K.NCOEF,
    }


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


def test_paper_curvature_flag():
    assert K.paper_curvature_flag(None, 3) == 1.0
    assert K.paper_curvature_flag([1.0, 1.0, 1.0], 5) == 1.0  # straight line: no curvature
    assert K.paper_curvature_flag([1.0, 1.0, -1.0], 5) == 0.0  # reversal: ||d2 - d1|| = 2||d2||
    assert K.paper_curvature_flag([float("nan"), 1.0, 0.0], 5) == 0.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(variant="pade"), "variant must be one of"),
        (dict(stage="mid"), "stage must be one of"),
        (dict(delta=1.0), "delta must be in"),
        (dict(kappa=-1.0), "kappa and mu must be >= 0"),
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
