"""Test setup: run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time, before any test module imports tcpade.kernels. On a CUDA machine the
kernels run compiled (set TRITON_INTERPRET=1 yourself to interpret there too).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(), (
    "triton was imported before TRITON_INTERPRET could be set"
)

import pytest  # noqa: E402

from tcpade import ops  # noqa: E402  # noqa: E402


def backend_cases():
    """(device, backend) pairs present in this process: every one is tested."""
    cases = [("cpu", b) for b in ops.available_backends("cpu")]
    if torch.cuda.is_available():
        cases += [("cuda", b) for b in ops.available_backends("cuda")]
    return cases


def pytest_report_header(config):
    return f"tcpade backends: {backend_cases()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def backend(request):
    device, name = request.param
    with ops.use_backend(name):
        yield device, name


# Examples run by the property-based tests (tests/test_fuzz.py), printed in the test log.
_EXAMPLES: dict = {}


def record_examples(name: str) -> None:
    _EXAMPLES[name] = _EXAMPLES.get(name, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if _EXAMPLES:
        runs = ", ".join(f"{name} {n}" for name, n in _EXAMPLES.items())
        terminalreporter.write_line(
            f"hypothesis examples run: {runs} (total {sum(_EXAMPLES.values())}; "
            f"backends {ops.available_backends('cpu')})"
        )
