"""The package's layers import downwards only: core < policy < integrations < tools.

Every ``import`` / ``from ... import`` in every module of ``tcpade`` (module level and inside
functions, relative or absolute) is resolved to the tcpade module it names; a module may name
only its own layer or a layer below it. ``tcpade.kernels`` and ``tcpade._C`` (the device code)
count as core, ``tcpade.zoo`` as tools. The package's ``__init__`` (the public facade, which
loads its names on first use) and ``__main__`` sit above every layer.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "tcpade"
KERNELS = PKG.parent / "kernels" / "tcpade_kernels"
ORDER = ["core", "policy", "integrations", "tools"]
TOP = {"kernels": "core", "_C": "core", "zoo": "tools"}


def layer_of(dotted: str):
    """The layer of a module name ``tcpade.x.y``; None for the facade itself."""
    parts = dotted.split(".")
    assert parts[0] == "tcpade", dotted
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return None
    if parts[1] in ORDER:
        return parts[1]
    if parts[1] in TOP:
        return TOP[parts[1]]
    raise AssertionError(f"{dotted}: a module outside every layer (add it to a layer subpackage)")


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        yield ".".join(rel.parts), path
    for path in sorted(KERNELS.rglob("*.py")):
        rel = path.relative_to(KERNELS).with_suffix("")
        yield ".".join(("tcpade", "kernels") + rel.parts).removesuffix(".__init__"), path


def imported(name: str, path: pathlib.Path):
    """(line, absolute tcpade module name) of every tcpade import in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    if name.endswith(".__init__"):
        package = name.removesuffix(".__init__")
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tcpade":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "tcpade":
                continue
            if node.module is None or mod.count(".") < 2:
                # ``from . import x`` / ``from tcpade import x``: the names are modules (or the facade's names)
                for a in node.names:
                    yield node.lineno, f"{mod}.{a.name}"
            else:
                yield node.lineno, mod


def violations():
    out = []
    for name, path in modules():
        mine = layer_of(name)
        if mine is None:
            continue
        for line, target in imported(name, path):
            if target == "tcpade.__version__":  # a constant of the facade, imports nothing
                continue
            parts = target.split(".")
            theirs = layer_of(target) if len(parts) > 1 and (parts[1] in ORDER or parts[1] in TOP) else "facade"
            if theirs == "facade":
                out.append(f"{path.relative_to(PKG.parent)}:{line}: {name} ({mine}) imports the facade {target}")
            elif ORDER.index(theirs) > ORDER.index(mine):
                out.append(f"{path.relative_to(PKG.parent)}:{line}: {name} ({mine}) imports {target} ({theirs})")
    return out


def test_layers_import_downwards_only():
    assert violations() == []


def test_every_module_is_in_a_layer():
    names = [n for n, _ in modules()]
    assert len(names) > 20
    for n in names:
        layer_of(n)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The test above can fail: a core module importing policy, or integrations importing
    tools (inside a function, relatively), is reported."""
    core = PKG / "core" / "ops.py"
    found = list(imported("tcpade.core.ops", core))
    assert found, "the checker finds ops' own imports"
    src = "def f():\n    from ..tools import cli\n    from ..policy.config import TCPadeConfig\n"
    fake = tmp_path / "fake.py"
    fake.write_text(src)
    got = [t for _, t in imported("tcpade.core.fake", fake)]
    assert got == ["tcpade.tools.cli", "tcpade.policy.config"]
    assert [layer_of(t) for t in got] == ["tools", "policy"]


@pytest.mark.parametrize("layer", ORDER)
def test_each_layer_says_what_it_owns_and_may_import(layer):
    import importlib

    doc = importlib.import_module(f"tcpade.{layer}").__doc__ or ""
    assert "May import" in doc and "Owns" in doc, f"tcpade.{layer}'s docstring"
