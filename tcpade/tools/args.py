"""What the ``tcpade`` subcommands share: argument checks and one-line usage errors (the progress
bar is ``tcpade.integrations.progress``, shared with ``tcpade.sample``).

``tcpade.tools.cli`` imports the subcommand modules (``demo``, ``bench``, ``calibrate``); they
import this module, never ``cli``. Like ``cli``, it imports neither torch nor diffusers, so a
subcommand's ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os

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
    """A bad command-line value found after parsing: ``tcpade.tools.cli.main`` prints it as one line
    and exits 2. The message names the flag: ``--passes must be in [2, 20], got 25``."""


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
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}: {path!r} exists and is not a folder")


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
