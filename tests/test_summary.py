"""tcpade.summary: the per-branch step table and its plot."""

import math

import pytest
import torch
from helpers import rule_fast, rule_slow
from helpers import synthetic_run as run  # the synthetic block stack

import tcpade
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.plan import Resolved
from tcpade.policy.runtime import Runtime


def test_summary_table_lists_decisions_per_branch():
    rt, passes, _, _ = run(rule_slow(), 20, branches=("cond", "uncond"))
    s = tcpade.summary(rt)
    assert s.computed("cond") == [0, 1, 2, 3, 4, 8, 12, 16, 19]
    assert s.skipped("uncond") == [5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18]
    text = str(s)
    assert "branch 'cond': 9/20 computed (2.22x fewer block-stack passes)" in text
    assert "branch 'uncond'" in text and "| skip    |" in text and "| warmup     |" in text
    assert s.history_bytes == rt.nbytes > 0


def test_summary_reports_nonfinite_steps():
    """A NaN in h_out at step 8 of a fixed schedule: the step, and every skip that predicted from
    that residual while it was in the history (its prediction fell back, finite), are reported
    after the run; the computed steps after it store clean residuals."""
    rt, _, _, outs = run(rule_slow(), 20, nan_at=8)
    s = tcpade.summary(rt)
    bad = s.nonfinite("default")
    assert bad[:4] == [8, 9, 10, 11] and set(bad[1:]) <= set(s.skipped("default")), bad
    assert all(torch.isfinite(outs["default"][k]).all() for k in bad[1:])
    assert "non-finite values at steps [8, 9, 10, 11" in str(s) and "the fixed schedule was kept" in str(s)
    rt, _, _, _ = run(TCPadeConfig(tolerance=0.3), 20, nan_at=8)
    assert "computed fully from there on" in str(tcpade.summary(rt))


def test_summary_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rt, _, _, _ = run(rule_fast(), 20, branches=("cond", "uncond"))
    path = tmp_path / "tsi.png"
    tcpade.summary(rt).plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_unapplied_module_raises():
    with pytest.raises(RuntimeError, match="not applied"):
        tcpade.summary(torch.nn.Linear(2, 2))
    assert isinstance(Runtime().config, TCPadeConfig)


def test_records_are_read_from_the_device_only_when_asked():
    """A branch's records are the host's: looking at them waits for nothing, and what only the
    device sums tell (TSI, non-finite values) is not in them yet. ``Runtime.records`` and the
    summary read them: one wait per branch, once."""
    rt, _, _, _ = run(rule_slow(), 20, branches=("cond", "uncond"), nan_at=8)
    raw = rt.branches["cond"].records
    assert len(raw) == 20 and rt.host_reads == 0
    assert not any(r.sums.read or r.nonfinite for r in raw) and all(math.isnan(r.tsi) for r in raw)
    recs = rt.records("cond")
    assert recs is raw and rt.host_reads == 1
    assert recs[8].nonfinite and math.isfinite(recs[4].tsi)
    assert tcpade.summary(rt).nonfinite("cond")[0] == 8
    assert rt.host_reads == 2  # the summary read "uncond"; "cond" was read already


def test_summary_shows_what_was_resolved_for_the_model():
    """A predictor chosen by calibration (here given by hand) runs on the model's calibrated
    schedules, the config's own on the spaced rule (the predictor is settled per run); both head
    the summary, each plan line names its run's; the config stays the user's."""
    cfg = TCPadeConfig.budget(passes=7, calibrated_predictor=True)
    cal = (0, 1, 3, 6, 10, 14, 18)
    resolved = Resolved(cfg, predictor="reuse", calibrated=((20, cal),))
    rt = Runtime(cfg, resolved=resolved)
    assert rt.config is cfg and rt.resolved.predictor == "reuse" and cfg.predictor == "rational"
    assert resolved.predictor_for(20) == "reuse" and resolved.predictor_for(12) == "rational"
    rt, _, _, _ = run(cfg, 20, rt=rt)
    assert rt.branches["default"].run.predictor == "reuse"
    text = str(tcpade.summary(rt))
    assert text.startswith("tcpade: predictor=reuse on the calibrated schedules made for it, rational (the config's) "
                           "on the others")
    assert f"schedule: calibrated {list(cal)} (unvalidated: no held-out check); predictor reuse" in text
    assert tcpade.summary(rt).computed("default") == list(cal)
    rt, _, _, _ = run(cfg, 12, rt=rt)
    assert rt.branches["default"].run.predictor == "rational"
    assert f"schedule: spaced rule {list(resolved.plan(12))}; predictor rational" in str(tcpade.summary(rt))
    with pytest.raises(ValueError, match="another config"):
        Runtime(TCPadeConfig(), resolved=Resolved(cfg))


def test_summary_shows_the_held_out_check_of_a_calibrated_plan():
    """A calibrated plan's line carries its held-out check against the spaced rule; one without a
    check says it is unvalidated; a spaced-rule plan says when it replaced a calibrated schedule
    that lost its check."""
    cfg = TCPadeConfig.budget(passes=7)
    cal = (0, 1, 3, 6, 10, 14, 18)
    for checks, note in ((((20, 7, 38.123, 37.2),), "(held-out 38.12 dB, spaced rule 37.20 dB)"),
                         ((), "(unvalidated: no held-out check)")):  # fmt: skip
        rt, _, _, _ = run(cfg, 20, rt=Runtime(cfg, resolved=Resolved(cfg, calibrated=((20, cal),), checks=checks)))
        assert f"schedule: calibrated {list(cal)} {note}" in str(tcpade.summary(rt))
    lost = Resolved(cfg, checks=((20, 7, 36.0, 37.2),))
    rt, _, _, _ = run(cfg, 20, rt=Runtime(cfg, resolved=lost))
    text = str(tcpade.summary(rt))
    assert (f"schedule: spaced rule {list(lost.plan(20))} (the calibrated schedule did not beat it on held-out inputs: "
            "36.00 dB, spaced rule 37.20 dB)") in text  # fmt: skip
    rt, _, _, _ = run(cfg, 20)  # nothing calibrated: no note
    assert f"schedule: spaced rule {list(cfg.plan(20))}\n" in str(tcpade.summary(rt))
