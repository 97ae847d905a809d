"""Golden decisions and outputs of the presets, recorded before the runtime was restructured.

For every preset (``TCPadeConfig.slow/fast/paper/adaptive``; ``rule-slow`` / ``rule-fast`` are the
TSI rules that slow() and fast() were before they became compute budgets, kept as cases of the
runtime's math) at 20 steps, on the three
trained zoo models (two samples each, with the zoo's own guidance) and on the tiny
random-weight FLUX pipeline with true classifier-free guidance (separate cond / uncond
calls), ``tests/golden/presets.json`` holds per branch the computed steps, each call's
reason, TSI and probe error, and the SHA-256 of the float32 output bytes. The test
reruns them and compares exactly: the same decisions, the same floats, the same bits
(CPU, the default backend of this machine; regenerate with
``python tests/test_golden.py --write`` only for a deliberate change of the math, and
say which in the commit; ``--add`` computes only the cases the file does not have yet).
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from helpers import rule_fast, rule_slow  # noqa: E402

from tcpade import TCPadeConfig, ops, tiny, zoo  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "presets.json"
CONFIGS = {"rule-slow": rule_slow, "rule-fast": rule_fast, "paper": TCPadeConfig.paper,
           "adaptive": TCPadeConfig.adaptive, "slow": TCPadeConfig.slow, "fast": TCPadeConfig.fast}  # fmt: skip
PRESETS = tuple(CONFIGS)
STEPS = 20


def _float(x):
    return None if math.isnan(x) else x


def _record(out: torch.Tensor, summary) -> dict:
    branches = {}
    for name, recs in summary.branches.items():
        branches[name] = dict(
            computed=[r.k for r in recs if r.computed],
            reasons=[r.reason for r in recs],
            tsi=[_float(r.tsi) for r in recs],
            error=[_float(r.error) for r in recs],
            nonfinite=[r.k for r in recs if r.nonfinite],
        )
    data = out.detach().to(torch.float32).contiguous().cpu()
    return dict(sha256=hashlib.sha256(data.numpy().tobytes()).hexdigest(), sum=float(data.double().sum()),
                branches=branches)  # fmt: skip


def _zoo_case(name, preset):
    m = zoo.load(name)
    labels = [i % m.spec.num_classes for i in (3, 7)]
    images, summary = m.sample(seeds=[0, 1], labels=labels, steps=STEPS, config=CONFIGS[preset](),
                               return_summary=True)  # fmt: skip
    return _record(images, summary)


def _flux_cfg_case(preset):
    pipe, generate = tiny.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tcpade.apply(pipe, CONFIGS[preset]())
    try:
        out = generate(STEPS)
        return _record(out, tcpade.summary(pipe))
    finally:
        tcpade.remove(pipe)


# The zoo models the golden file was recorded on (later zoo models are not in it).
GOLDEN_MODELS = ("flux-digits", "dit-faces", "wan-digits")
# Recorded with two torch threads (the 2-core development machine's default); another
# thread count sums the matmuls in another order and changes the float bits.
THREADS = 2
CASES = [(f"{m}/{p}", m, p) for m in GOLDEN_MODELS for p in PRESETS] + [(f"tiny-flux-cfg/{p}", None, p) for p in PRESETS]


def compute(model, preset) -> dict:
    with torch.no_grad():
        return _zoo_case(model, preset) if model is not None else _flux_cfg_case(preset)


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(autouse=True)
def _recorded_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("case, model, preset", CASES, ids=[c[0] for c in CASES])
def test_presets_match_golden(golden, case, model, preset):
    want = golden["cases"][case]
    got = compute(model, preset)
    assert got["branches"] == want["branches"], case
    assert got["sum"] == want["sum"] and got["sha256"] == want["sha256"], (case, got["sum"], want["sum"])


if __name__ == "__main__" and ("--write" in sys.argv or "--add" in sys.argv):
    torch.set_num_threads(THREADS)
    have = json.loads(GOLDEN.read_text())["cases"] if "--add" in sys.argv else {}
    cases = {case: have[case] if case in have else compute(model, preset) for case, model, preset in CASES}
    meta = dict(torch=torch.__version__, backends=ops.available_backends("cpu"), steps=STEPS)
    GOLDEN.write_text(json.dumps(dict(meta=meta, cases=cases), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(cases)} cases)")
