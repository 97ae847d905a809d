"""The ``tcpade`` command (also ``python -m tcpade``).

    tcpade demo                      full computation vs the presets on a model shipped with tcpade
    tcpade bench PIPELINE_DIR|ZOO    the same on your own diffusers pipeline (a local folder) or a zoo model
    tcpade --version

This module imports neither torch nor diffusers: ``tcpade --help`` and ``tcpade --version``
answer at once, and a subcommand's module is imported only when that subcommand runs (or
its ``--help`` is asked for). A subcommand is a module with ``add_cli(subparsers)`` (adds
its parser, named as in the table below) and ``run_cli(args) -> int``; its module must not
import torch at import time either.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

# (name, module, one-line help). Add a subcommand here: one line.
SUBCOMMANDS = [
    ("demo", "tcpade.demo", "full computation vs tcpade's presets on a trained model shipped with tcpade"),
    ("bench", "tcpade.bench", "full computation vs presets/configs on your diffusers pipeline or a zoo model"),
    ("calibrate", "tcpade.calibrate", "search which steps to compute for a model, once, and save the schedules"),
]

# Third-party modules a subcommand may need, and the extra that installs them.
EXTRAS = {
    "diffusers": "demo",
    "transformers": "demo",
    "accelerate": "demo",
    "safetensors": "demo",
    "PIL": "demo",
    "matplotlib": "demo",
}


def _version() -> str:
    from . import __version__

    return __version__


def _parser(chosen):
    parser = argparse.ArgumentParser(
        prog="tcpade",
        description="TC-Pade caching for diffusion transformers: skip block-stack passes, predict the residual.",
    )
    parser.add_argument("--version", action="version", version=f"tcpade {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module, help_line in SUBCOMMANDS:
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_cli(sub)
        else:  # listed in --help without importing the module
            sub.add_parser(name, help=help_line, add_help=False)
    return parser, modules


def require(*modules: str) -> None:
    """Import ``modules`` now, so that a missing extra stops a subcommand before any work."""
    for name in modules:
        importlib.import_module(name)


def missing_extra(exc: ImportError, command: str):
    """The one-line message for a subcommand whose optional dependency is absent, or None."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return f"tcpade {command}: needs {name}, which is not installed; install the extra: pip install 'tcpade[{extra}]'"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [n for n, _, _ in SUBCOMMANDS]
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen is not None and chosen not in names:
        print(f"tcpade: unknown command {chosen!r}; choose from {', '.join(names)} (tcpade --help)", file=sys.stderr)
        return 2
    try:
        parser, modules = _parser(chosen)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(modules[args.command].run_cli(args) or 0)
    except ImportError as exc:
        msg = missing_extra(exc, chosen or "")
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 1


class Progress:
    """A one-line progress bar on stdout, redrawn in place; silent when stdout is not a terminal
    (unless forced), so logs and pipes get only the results."""

    def __init__(self, total: int, label: str, enabled=None, width: int = 24, stream=None):
        self.stream = stream or sys.stdout
        self.total, self.label, self.width, self.done = total, label, width, 0
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self._draw("")

    def _draw(self, what: str):
        if not self.enabled:
            return
        n = round(self.width * self.done / max(1, self.total))
        bar = "#" * n + "-" * (self.width - n)
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what:<24s}")
        self.stream.flush()

    def step(self, what: str = ""):
        self.done += 1
        self._draw(what)

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + self.width + 42) + "\r")
            self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
