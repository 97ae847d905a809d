"""Clear messages for a bad TCPadeConfig and for a summary with nothing in it."""

import dataclasses

import pytest

import tcpade
from tcpade.policy.config import _CHECKS, CONCERNS, ConfigTypeError, TCPadeConfig
from tcpade.policy.runtime import Runtime

# A value of the wrong type for every field (a str where a number goes, a number where a str
# or a bool goes, a float where an int goes, a bool where an int goes).
WRONG_TYPE = {
    "predictor": 3,
    "policy": None,
    "level": 1,
    "warmup": 2.0,
    "interval": "4",
    "final_steps": True,
    "tsi_threshold": "0.5",
    "tolerance": "0.1",
    "max_skips": 1.5,
    "store_predictions": 1,
    "input_correction": "0.2",
    "early_frac": "0.3",
    "late_frac": [0.8],
    "pole_delta": "0.3",
    "kappa": None,
    "history_slots": 3.0,
    "schedule": "0 1 5",
    "schedule_steps": 20.0,
    "passes": "8",
    "speedup": "2.5",
    "use_calibrated": 1,
    "calibrated_predictor": "yes",
    "budget_max_run": 3.0,
    "time_axis": 1,
    "damping": "1",
    "extrapolate": 0,
    "time_spacing": "0.5",
}


def test_every_field_has_a_check_and_a_concern():
    """A field added to TCPadeConfig without a row in its validation table, or without a concern,
    fails here; a relation row names fields."""
    fields = [f.name for f in dataclasses.fields(TCPadeConfig)]
    assert sorted(n for n in _CHECKS if "/" not in n) == sorted(fields)
    assert all(set(n.split("/")) <= set(fields) for n in _CHECKS if "/" in n)
    assert sorted(WRONG_TYPE) == sorted(fields)
    assert sorted(n for names in CONCERNS.values() for n in names) == sorted(fields)
    grouped = TCPadeConfig.fast().by_concern()
    assert list(grouped) == ["predictor", "policy", "schedule", "budget"]
    assert grouped["budget"] == dict(passes=None, speedup=3.0, budget_max_run=3, use_calibrated=True,
                                     calibrated_predictor=True, time_spacing=0.5)  # fmt: skip


def test_what_calibration_resolves_is_no_field():
    """The model's calibrated schedules are kept on the runtime (Resolved), not in the config."""
    with pytest.raises(TypeError, match="calibrated"):
        TCPadeConfig(calibrated=((20, (0, 1, 5)),))


@pytest.mark.parametrize("field", sorted(WRONG_TYPE))
def test_wrong_type_names_the_field_and_the_type(field):
    value = WRONG_TYPE[field]
    with pytest.raises(TypeError) as info:
        TCPadeConfig(**{field: value})
    msg = str(info.value)
    assert msg.startswith(f"TCPadeConfig.{field} must be "), msg
    assert type(value).__name__ in msg and repr(value) in msg, msg
    # Also a ValueError: `except ValueError` catches every bad config.
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigTypeError)


def test_pole_delta_as_string():
    with pytest.raises(TypeError, match=r"^TCPadeConfig\.pole_delta must be a number, got str '0\.3'$"):
        TCPadeConfig(pole_delta="0.3")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(pole_delta=1.5), r"TCPadeConfig\.pole_delta must be in \(0, 1\), got 1\.5"),
        (dict(tolerance=float("nan")), r"TCPadeConfig\.tolerance must be a finite number > 0, got nan"),
        (dict(tsi_threshold=float("nan")), r"TCPadeConfig\.tsi_threshold must be a number >= 0, got nan"),
        (dict(history_slots=2), r"TCPadeConfig\.history_slots must be an int >= 3, got 2"),
        (dict(predictor="pade"), r"TCPadeConfig\.predictor must be one of \('paper', 'rational'"),
        (dict(level="blocks"), r"TCPadeConfig\.level must be one of \('block', 'output'\), got 'blocks'"),
        (dict(early_frac=0.5, late_frac=0.4), r"early_frac <= late_frac .* early_frac=0\.5, late_frac=0\.4"),
        (dict(passes=0), r"TCPadeConfig\.passes must be None or an int >= 1 \(the 'rational' predictor's minimum"),
        (dict(predictor="paper", passes=1), r"TCPadeConfig\.passes must be None or an int >= 2 \(the 'paper' predictor"),
        (dict(extrapolate="out"), r"TCPadeConfig\.extrapolate must be one of \('residual', 'h_out'\), got 'out'"),
        (dict(predictor="auto", input_correction=0.2), r"TCPadeConfig\.input_correction must be None or 0 with"),
        (dict(schedule_steps=20), r"TCPadeConfig\.schedule_steps must be None without a schedule, got 20"),
        (dict(late_frac=1.2), r"TCPadeConfig\.late_frac must be in \[0, 1\], got 1\.2"),
        (dict(time_spacing=1.5), r"TCPadeConfig\.time_spacing must be a finite number in \[0, 1\], got 1\.5"),
        (dict(time_spacing=float("nan")), r"TCPadeConfig\.time_spacing must be a finite number in \[0, 1\], got nan"),
    ],
)
def test_out_of_range_names_field_and_range(kw, message):
    with pytest.raises(ValueError, match=message) as info:
        TCPadeConfig(**kw)
    assert not isinstance(info.value, TypeError)


def test_numpy_scalars_and_ints_for_floats_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = TCPadeConfig(warmup=np.int64(2), tolerance=np.float32(0.1), pole_delta=0.25, kappa=1, early_frac=0)
    assert cfg.warmup == 2 and cfg.kappa == 1
    # every field alike, the budget's and the schedule's too (one check per field)
    assert TCPadeConfig.budget(passes=np.int64(8)).plan(20) == TCPadeConfig.budget(passes=8).plan(20)
    assert TCPadeConfig.budget(speedup=np.float32(2.5)).plan(20) == TCPadeConfig.budget(speedup=2.5).plan(20)
    times = [1000.0 * (1 - k / 20) * 3 / (1 + 2 * (1 - k / 20)) for k in range(20)]  # shift 3
    assert TCPadeConfig.budget(passes=8, time_spacing=np.float32(0.5)).plan(20, times) == TCPadeConfig.budget(
        passes=8, time_spacing=0.5).plan(20, times)  # fmt: skip
    assert TCPadeConfig(schedule=[0, 1, 5], schedule_steps=np.int64(8)).plan(8) == (0, 1, 5)
    # The presets pass their own check.
    for preset in (TCPadeConfig.paper, TCPadeConfig.slow, TCPadeConfig.fast, TCPadeConfig.adaptive):
        assert isinstance(preset(), TCPadeConfig)


def test_summary_before_any_run_says_so(tmp_path):
    s = tcpade.summary(Runtime(TCPadeConfig.slow()))
    assert s.empty
    assert "nothing has run yet" in str(s)
    pytest.importorskip("matplotlib")
    with pytest.raises(RuntimeError, match="nothing to plot, no transformer call has run yet"):
        s.plot(tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_summary_after_a_run_is_not_empty():
    from helpers import synthetic_run as run  # the synthetic block stack

    rt, _, _, _ = run(TCPadeConfig.slow(), 8)
    s = tcpade.summary(rt)
    assert not s.empty and "nothing has run yet" not in str(s)
