"""bench/host_cost.py: a smoke run of every part on tiny sizes (a few seconds of CPU; the
numbers are not checked, only that each part runs, reports and writes its file)."""

import host_cost


def test_host_cost_quick(tmp_path, capsys):
    out = tmp_path / "host_cost.txt"
    host_cost.main(["--quick", "--repeats", "1", "--parts", "calls,e2e,profile", "--out", str(out)])
    text = out.read_text()
    assert "on, skipping" in text and "of ideal" in text and "skipped calls" in text
    assert "tcpade from" in text
