"""tcpade.summary: the per-branch step table and its plot."""

import pytest
import torch
from helpers import rule_fast, rule_slow
from helpers import synthetic_run as run  # the synthetic block stack

import tcpade
from tcpade.policy.config import TCPadeConfig
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
