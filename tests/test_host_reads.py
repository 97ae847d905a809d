"""No device read per call on the hot path: every tensor-to-Python conversion made by tcpade's
own code during a pipeline run is counted, and a fixed schedule makes exactly the documented
number (docs/runtime.md, "Host synchronisation").

On a GPU each such conversion (``float(t)``, ``.item()``, ``.tolist()``, ...) waits for the
device's queue to drain. The counting wraps those methods of ``torch.Tensor`` and records a
call only when the frame that made it is a module of the tcpade package, so the pipeline's
and the scheduler's own conversions (diffusers' business, the same with and without tcpade)
are left out. The runs use the Triton backend (the GPU path; under the interpreter here): the
C++ and torch CPU backends read the ring's slot order on the host, where there is no device
to wait for.
"""

import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import tcpade  # noqa: E402
from tcpade import TCPadeConfig, kernels, ops  # noqa: E402
from tcpade.tools import tiny  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton")
CONVERSIONS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu")
# tcpade's code: the package and its Triton kernels' launchers (installed as tcpade.kernels).
CODE = {os.path.dirname(os.path.abspath(m.__file__)) + os.sep: name for name, m in (("", tcpade), ("kernels/", kernels))}


@pytest.fixture
def reads(monkeypatch):
    """The (method, file, line) of every tensor-to-Python conversion made by tcpade's code."""
    seen = []
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            for folder, prefix in CODE.items():
                if caller.startswith(folder):
                    seen.append((_name, prefix + os.path.relpath(caller, folder), frame.f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with ops.use_backend("triton"):
        yield seen


def _flux(steps):
    pipe, generate = tiny.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda: generate(steps)


@pytest.mark.parametrize("preset", ["slow", "fast", "paper"])
def test_a_fixed_schedule_reads_the_device_once_per_run(reads, preset):
    """A FLUX pipeline with true CFG (cond and uncond calls), 12 steps, a fixed schedule: one
    read per run (the schedule's timesteps copied to the host at the run's first call), none
    per transformer call; the summary's read of the sums comes after the run, one per branch."""
    pipe, run = _flux(12)
    rt = tcpade.apply(pipe, getattr(TCPadeConfig, preset)())
    assert rt.config.plan(12) is not None  # a fixed schedule
    for n in (1, 2):
        run()
        assert len(reads) == n, reads
        assert all(name == "tolist" and where == "integrations/api.py" for name, where, _ in reads), reads
    assert rt.host_reads == 2
    # The branches' records are the host's: looking at them reads nothing from the device.
    recs = rt.branches["cond"].records + rt.branches["uncond"].records
    assert len(recs) == 24 and not any(r.sums.read for r in recs)
    assert len(reads) == 2 and rt.host_reads == 2
    # The summary, after the run: one wait per branch; its conversions read the host copies
    # of the sums that each write queued (pinned memory on CUDA), in Sums.get.
    assert len(tcpade.summary(pipe).computed("cond")) < 12
    assert rt.host_reads == 2 + 2 and all(r.sums.read for r in recs)
    assert {(name, where) for name, where, _ in reads[2:]} == {("tolist", "core/history.py")}
    tcpade.remove(pipe)


def test_without_a_clock_each_call_reads_its_timestep(reads):
    """A bare transformer has no scheduler to copy: each call reads its timestep tensor once
    (counted in host_reads); a Python float costs nothing."""
    transformer, inputs, _ = tiny.FAMILIES["flux"]()
    rt = tcpade.apply(transformer, TCPadeConfig.slow(), num_steps=6)
    with torch.no_grad():
        for k in range(6):
            transformer(**inputs(k))
    assert [name for name, _, _ in reads] == ["__float__"] * 6
    assert rt.host_reads == 6
    tcpade.remove(transformer)


def test_the_custom_loop_reads_its_schedule_once(reads):
    """tcpade.sample copies its timesteps and sigmas to the host once per run."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer, inputs, _ = tiny.FAMILIES["flux"]()
    kw = inputs(0)
    latents, timestep = kw.pop("hidden_states"), kw.pop("timestep")
    del timestep
    kw.pop("return_dict", None)
    _, summary = tcpade.sample(transformer, FlowMatchEulerDiscreteScheduler(), latents, kw, steps=10,
                               config=TCPadeConfig.fast(), timestep_scale=1e-3, progress=False,
                               return_summary=True)  # fmt: skip
    loop = [r for r in reads if r[1] == "integrations/sampling.py"]
    assert [name for name, _, _ in loop] == ["tolist", "tolist"], reads
    assert len(summary.computed("cond")) < 10
    hot = ("integrations/adapters.py", "policy/")  # the calls' path: nothing but the schedule's copies
    assert not [r for r in reads if r[1].startswith(hot) and r[0] != "tolist"], reads
