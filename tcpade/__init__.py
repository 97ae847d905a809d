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
    "distributed",
    "metrics",
    "ops",
    "reference",
    "schedules",
    "tsi_from_sums",
    "__version__",
]


# Short public names of modules that live in the layer subpackages (core < policy <
# integrations < tools; see docs/architecture.md).
_SUBMODULES = {
    "coef": "core.coef",
    "ops": "core.ops",
    "reference": "core.reference",
    "schedules": "policy.schedules",
    "distributed": "integrations.distributed",
    "metrics": "tools.metrics",
}
# public name -> the module that defines it
_NAMES = {
    "Summary": "integrations.api",
    "apply": "integrations.api",
    "remove": "integrations.api",
    "runtime": "integrations.api",
    "summary": "integrations.api",
    "sample": "integrations.sampling",
    "History": "core.history",
    "Runtime": "policy.runtime",
    "StepRecord": "policy.runtime",
    "TCPadeConfig": "policy.config",
    "tsi_from_sums": "core.reference",
}


def _load():
    import importlib

    for short, sub in _SUBMODULES.items():
        globals()[short] = importlib.import_module(f".{sub}", __name__)
    for name, sub in _NAMES.items():
        globals()[name] = getattr(importlib.import_module(f".{sub}", __name__), name)


def __getattr__(name):
    if name == "calibrate":
        # A callable module (the schedule search, save/load, its CLI), imported on first use so
        # that ``tcpade calibrate`` does not find it imported already.
        import importlib

        return importlib.import_module(".tools.calibrate", __name__)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    if name in _NAMES:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'tcpade' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
