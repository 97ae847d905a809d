"""Every Python code block of README.md and docs/*.md runs, so a snippet cannot rot.

The blocks of one file run in order in one namespace (as a reader would paste them), in a
temporary folder, on the small models that ship with tcpade. A block that needs a GPU or a
download is marked just above its fence with an HTML comment, ``<!-- skip: REASON -->``, and
is skipped with that reason; every other block runs. The counts are printed at the end of
the test session ("README/docs code blocks: ...").

Also checked: no document points outside the repository, and every relative link resolves.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(.+?)\s*-->\s*$")

_COUNTS = {}  # file -> (ran, [(line, reason) skipped])


def blocks(path: Path):
    """(first line number, language, source, skip reason or None) of each fenced block."""
    out, lines = [], path.read_text().splitlines()
    i, pending_skip = 0, None
    while i < len(lines):
        m_skip = SKIP.match(lines[i])
        if m_skip:
            pending_skip = m_skip.group(1)
            i += 1
            continue
        m = FENCE.match(lines[i])
        if m:
            lang, start, body = m.group(1), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start, lang, "\n".join(body) + "\n", pending_skip))
            pending_skip = None
        elif lines[i].strip():
            pending_skip = None  # a skip marker applies to the very next block only
        i += 1
    return out


class _Report:
    def pytest_terminal_summary(self, terminalreporter):
        for name, (ran, skipped) in _COUNTS.items():
            why = "; ".join(f"line {ln}: {reason}" for ln, reason in skipped)
            terminalreporter.write_line(
                f"README/docs code blocks: {name}: ran {ran} Python block(s), skipped {len(skipped)}"
                + (f" ({why})" if why else "")
            )


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    if not request.config.pluginmanager.has_plugin("tcpade-readme-blocks"):
        request.config.pluginmanager.register(_Report(), "tcpade-readme-blocks")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    # A reader runs these in a fresh process: no graphs compiled by earlier tests (their
    # recompiles would count against dynamo's limit for the blocks compiled here).
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ns = {"__name__": "__readme__"}
    ran, skipped = 0, []
    try:
        for line, lang, src, skip in blocks(path):
            if lang != "python":
                continue
            if skip:
                skipped.append((line, skip))
                continue
            code = compile(src, f"{path.name}:{line}", "exec")
            try:
                exec(code, ns)
            except Exception as exc:
                raise AssertionError(f"{path.name}, block at line {line} failed: {exc!r}\n{src}") from exc
            ran += 1
    finally:
        torch.set_num_threads(threads)
    _COUNTS[str(path.relative_to(ROOT))] = (ran, skipped)
    print(f"{path.name}: ran {ran} Python block(s), skipped {len(skipped)}: {skipped}")
    if path.name == "README.md":
        assert ran >= 3, f"README.md: only {ran} Python blocks ran"


def test_hub_models_only_in_skipped_blocks():
    """A block that loads a model from a hub (nothing can be downloaded in the tests) is marked."""
    hub = re.compile(r"from_pretrained\(\s*[\"'][\w.-]+/[\w.-]+[\"']")
    for path in DOCS:
        for line, lang, src, skip in blocks(path):
            if lang == "python" and hub.search(src):
                assert skip, f"{path.name}:{line} loads a hub model but has no <!-- skip: ... --> marker"


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_documents_stand_alone(path):
    text = path.read_text()
    for bad in (r"\.\./shared", r"/work/", r"\bissue \d+", r"\bhelper\b"):
        assert not re.search(bad, text, re.IGNORECASE), f"{path.name} mentions {bad!r}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"\w+://", target):
            continue
        assert (path.parent / target).exists(), f"{path.name}: link to {target!r} does not resolve"


def test_skip_markers_sit_right_above_a_block():
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, ln in enumerate(lines):
            if SKIP.match(ln):
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                assert FENCE.match(nxt), f"{path.name}:{i + 1}: a skip marker not followed by a code block"
