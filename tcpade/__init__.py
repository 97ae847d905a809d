"""tcpade: TC-Pade caching for diffusion transformers.

At each denoising step either run the whole transformer block stack, or skip it and
predict its residual h_out - h_in from the last few residuals with a Pade (rational)
extrapolator. This package holds the fused kernels (Triton on CUDA, C++ on CPU), the
torch custom ops that dispatch to them, the float64 reference of the math, the
per-branch residual history, the skip policies and the diffusers integration. The method
and what was measured: docs/method.md in the repository.

    import tcpade
    tcpade.apply(pipe, tcpade.TCPadeConfig.fast())

The public names load on first use (``import tcpade`` itself imports no torch), so the
``tcpade`` command answers ``--help`` and ``--version`` at once; the first access to any of
them imports the whole library, which also registers the ``torch.ops.tcpade`` custom ops.
"""

__version__ = "0.1.0"

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


_SUBMODULES = ("coef", "ops", "reference", "schedules")
# public name -> the module that defines it
_NAMES = {
    "Summary": "api",
    "apply": "api",
    "remove": "api",
    "runtime": "api",
    "summary": "api",
    "sample": "sampling",
    "History": "history",
    "Runtime": "policy",
    "StepRecord": "policy",
    "TCPadeConfig": "config",
    "tsi_from_sums": "reference",
}


def _load():
    import importlib

    for sub in _SUBMODULES:
        globals()[sub] = importlib.import_module(f".{sub}", __name__)
    for name, sub in _NAMES.items():
        globals()[name] = getattr(importlib.import_module(f".{sub}", __name__), name)


def __getattr__(name):
    if name == "calibrate":
        # A callable module (the schedule search, save/load, its CLI), imported on first use so
        # that ``python -m tcpade.calibrate`` does not find it imported already.
        import importlib

        return importlib.import_module(".calibrate", __name__)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'tcpade' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
