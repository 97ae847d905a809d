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

What the subcommands share (UsageError, the argument checks, the progress bar) is in
``tcpade.tools.args``: this module imports the subcommands, they never import it.
"""

from __future__ import annotations

import importlib
import sys

from .args import ArgumentParser, UsageError, missing_extra

# (name, module, one-line help). Add a subcommand here: one line.
SUBCOMMANDS = [
    ("demo", "tcpade.tools.demo", "full computation vs tcpade's presets on a trained model shipped with tcpade"),
    ("bench", "tcpade.tools.bench", "full computation vs presets/configs on your diffusers pipeline or a zoo model"),
    ("calibrate", "tcpade.tools.calibrate", "search which steps to compute for a model, once, and save the schedules"),
]


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


if __name__ == "__main__":
    sys.exit(main())
