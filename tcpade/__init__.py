"""tcpade: TC-Pade caching for diffusion transformers.

At each denoising step either run the whole transformer block stack, or skip it and
predict its residual h_out - h_in from the last few residuals with a Pade (rational)
extrapolator. This package holds the fused kernels (Triton on CUDA, C++ on CPU), the
torch custom ops that dispatch to them, the float64 reference of the math, and the
per-branch residual history.
"""

from . import coef, ops, reference, schedules
from .api import Summary, apply, remove, runtime, summary
from .config import TCPadeConfig
from .history import History
from .policy import Runtime, StepRecord
from .reference import tsi_from_sums
from .sampling import sample

__version__ = "0.1.0"


def __getattr__(name):
    # tcpade.calibrate (a callable module: the schedule search, save/load, its CLI) is imported on
    # first use, so that ``python -m tcpade.calibrate`` does not find it imported already.
    if name == "calibrate":
        import importlib

        return importlib.import_module(".calibrate", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Summary",
    "apply",
    "calibrate",
    "remove",
    "runtime",
    "sample",
    "summary",
    "History",
    "Runtime",
    "StepRecord",
    "TCPadeConfig",
    "coef",
    "ops",
    "reference",
    "schedules",
    "tsi_from_sums",
    "__version__",
]
