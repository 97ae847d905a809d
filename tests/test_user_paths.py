"""The imports and commands a user runs, in fresh processes started where users start them.

Python puts the current folder first on ``sys.path`` (``python -m ...``, ``python -c``), so
from the repository root a top-level folder can hide an installed package of the same name.
transformers imports Hugging Face's ``kernels`` package while it loads; the repository's
``kernels/`` folder (the Triton kernels' home, installed as ``tcpade.kernels``) must never
stand in for it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


IMPORTS = """
import importlib.util, sys
spec = importlib.util.find_spec("kernels")
assert spec is None or spec.origin is None or not spec.origin.startswith(sys.argv[1]), spec.origin
import transformers.integrations.hub_kernels
from diffusers import FluxPipeline
import tcpade.kernels
from tcpade.kernels import predict, update
assert callable(predict) and callable(update)
print("kernels:", spec.origin if spec is not None else None)
print("tcpade.kernels:", tcpade.kernels.__file__)
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_imports_from_the_repository_root_and_elsewhere(where, tmp_path):
    pytest.importorskip("kernels")  # Hugging Face's package, which transformers >= 5 imports
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    cwd = ROOT if where == "root" else tmp_path
    r = _run(["-c", IMPORTS, str(ROOT / "kernels") + os.sep], cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert "site-packages" in first, first  # Hugging Face's kernels, not a folder of this repository


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_demo_help_from_the_repository_root_and_elsewhere(where, tmp_path):
    r = _run(["-m", "tcpade", "demo", "--help"], ROOT if where == "root" else tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: tcpade demo" in r.stdout
    assert r.stderr == ""


def test_nothing_named_kernels_at_the_root():
    """The folder has no __init__.py: at most a namespace portion, which never hides a package."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels.py").exists()
    assert (ROOT / "kernels" / "tcpade_kernels" / "__init__.py").exists()


def test_no_script_edits_sys_path():
    offenders = []
    for folder in ("bench", "tcpade", "tests", "kernels", "docs"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() == Path(__file__).resolve():
                continue
            text = path.read_text()
            if "sys.path.insert(" in text or "sys.path.append(" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
