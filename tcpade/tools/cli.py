"""The ``tcpade`` command (also ``python -m tcpade``).

    tcpade demo                      full computation vs the presets on a model shipped with tcpade
    tcpade bench PIPELINE_DIR|ZOO    the same on your own diffusers pipeline (a local folder) or a zoo model
    tcpade calibrate PIPELINE_DIR|ZOO --passes K    search which steps to compute, save the schedules
    tcpade --version

This module imports neither torch nor diffusers: ``tcpade --help``, ``tcpade --version`` and
every ``tcpade COMMAND --help`` answer at once, and a subcommand's module is imported only
when that subcommand runs (or its ``--help`` is asked for). A subcommand is a module with
``add_cli(subparsers)`` (adds its parser, named as in the table below) and
``run_cli(args) -> int``; its module must not import torch at import time either.

Bad values: argparse's own errors and the checks a subcommand makes after parsing (ranges,
lists, values that depend on each other) end the same way: one line on stderr,
``tcpade COMMAND: error: --flag ...``, and exit status 2, before any sampling (most of them
before torch is imported). A subcommand raises :class:`UsageError` for those; ``main``
prints it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

# (name, module, one-line help). Add a subcommand here: one line.
SUBCOMMANDS = [
    ("demo", "tcpade.tools.demo", "full computation vs tcpade's presets on a trained model shipped with tcpade"),
    ("bench", "tcpade.tools.bench", "full computation vs presets/configs on your diffusers pipeline or a zoo model"),
    ("calibrate", "tcpade.tools.calibrate", "search which steps to compute for a model, once, and save the schedules"),
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


# The zoo's models (tcpade.zoo.SPECS, which needs torch to import) and what each makes, for
# the subcommands' help and checks; tests/test_cli.py checks it against the zoo.
ZOO_MODELS = {
    "flux-digits": "images",
    "dit-faces": "images",
    "wan-digits": "clips",
    "flux-shapes": "images",
    "dit-photos": "images",
    "flux-photos": "images",
}


def zoo_names(kind=None):
    """The zoo's model names (those making ``kind``, "images" or "clips"), without importing torch."""
    return [n for n, k in ZOO_MODELS.items() if kind in (None, k)]


class UsageError(ValueError):
    """A bad command-line value found after parsing: ``main`` prints it as one line and exits 2.
    The message names the flag: ``--passes must be in [2, 20], got 25``."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG: error: MESSAGE``, exit 2), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def int_list(text: str, flag: str, lo=None, hi=None, rng=None) -> list:
    """``"1,2,3"`` -> [1, 2, 3]: at least one int, each in [lo, hi] (``rng``: that range in words);
    else UsageError naming ``flag``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} must list at least one integer, got {text!r}")
    bad = [v for v in values if (lo is not None and v < lo) or (hi is not None and v > hi)]
    if bad:
        if rng is None:
            rng = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if hi is None else f"<= {hi}"
        raise UsageError(f"{flag} must be {rng}, got {', '.join(map(str, bad))}")
    return values


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2**64)


def seeds(text: str, flag: str = "--seeds") -> list:
    """Seeds for torch.Generator.manual_seed: ints in [0, 2**64)."""
    return int_list(text, flag, 0, SEED_MAX, "integers in [0, 2**64 - 1]")


def at_least(value, lo, flag: str) -> None:
    """UsageError unless ``value`` (None: not given) is a finite number >= lo."""
    if value is not None and not (value == value and abs(value) != float("inf") and value >= lo):
        raise UsageError(f"{flag} must be {'an int' if isinstance(value, int) else 'a finite number'} >= {lo:g}, "
                         f"got {value}")  # fmt: skip


def writable_folder(path: str, flag: str) -> None:
    """UsageError when ``path`` (a folder to create or reuse) is an existing file."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} exists and is not a folder")


def _version() -> str:
    from .. import __version__

    return __version__


def _parser(chosen):
    parser = ArgumentParser(
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
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status (0 ok,
    2 a bad argument, 1 a missing extra) instead of exiting, also for ``--help``."""
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
    except SystemExit as exc:  # argparse: --help, --version, a parse error (printed already)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"tcpade {chosen}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
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
