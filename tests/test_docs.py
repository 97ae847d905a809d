"""The documents as a reader uses them: every code block of README.md and docs/*.md.

Each Python or pycon block runs on its own in a fresh process from an empty folder, and each
output block (``<!-- output: COMMAND -->``) is compared with what COMMAND prints now; the
rules and the rewrite command are in tests/doc_blocks.py. A block that needs a GPU or a
download is marked ``<!-- skip: REASON -->``; the counts are printed at the end of the test
session ("documentation blocks: ...").

Also checked: every runnable block says what it needs installed, no document points outside
the repository, and every relative link resolves.
"""

import re

import pytest
from doc_blocks import DOCS, FENCE, MARKER, ROOT, RUNNABLE, all_blocks, check_output, check_snippet

BLOCKS = all_blocks()
SNIPPETS = [b for b in BLOCKS if b.lang in RUNNABLE and b.marker != "skip"]
OUTPUTS = [b for b in BLOCKS if b.marker == "output"]
_RAN = {"snippets": 0, "outputs": 0}


class _Report:
    def pytest_terminal_summary(self, terminalreporter):
        skipped = [b.where for b in BLOCKS if b.marker == "skip"]
        terminalreporter.write_line(
            f"documentation blocks: {_RAN['snippets']} Python/pycon block(s) and {_RAN['outputs']} output block(s) "
            f"run, each in its own process; {len(skipped)} marked skip ({', '.join(skipped)})"
        )


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    if not request.config.pluginmanager.has_plugin("tcpade-doc-blocks"):
        request.config.pluginmanager.register(_Report(), "tcpade-doc-blocks")


def test_there_are_blocks_to_run():
    assert len([b for b in SNIPPETS if b.path.name == "README.md"]) >= 2
    assert len(OUTPUTS) >= 2


@pytest.mark.parametrize("block", SNIPPETS, ids=[b.where for b in SNIPPETS])
def test_snippet_runs_in_a_fresh_process(block):
    assert block.needs is not None, f"{block.where}: the first line must say what it needs installed"
    msg = check_snippet(block)
    assert msg is None, msg
    _RAN["snippets"] += 1


@pytest.mark.parametrize("block", OUTPUTS, ids=[b.where for b in OUTPUTS])
def test_output_block_is_what_the_command_prints(block):
    msg = check_output(block)
    assert msg is None, msg
    _RAN["outputs"] += 1


def test_every_install_profile_named_exists():
    tomllib = pytest.importorskip("tomllib")

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for b in BLOCKS:
        if b.lang in RUNNABLE:
            assert b.needs is not None, f"{b.where}: the first line must say what it needs installed"
            assert b.needs == "tcpade" or b.needs in extras, f"{b.where}: no extra named {b.needs!r}"


def test_hub_models_only_in_skipped_blocks():
    """A block that loads a model from a hub (nothing can be downloaded in the tests) is marked."""
    hub = re.compile(r"from_pretrained\(\s*[\"'][\w.-]+/[\w.-]+[\"']")
    for b in BLOCKS:
        if b.lang in RUNNABLE and hub.search(b.source):
            assert b.marker == "skip", f"{b.where} loads a hub model but has no <!-- skip: ... --> marker"


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_documents_stand_alone(path):
    text = path.read_text()
    for bad in (r"\.\./shared", r"/work/", r"\bissue \d+", r"\bhelper\b"):
        assert not re.search(bad, text, re.IGNORECASE), f"{path.name} mentions {bad!r}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"\w+://", target):
            continue
        assert (path.parent / target).exists(), f"{path.name}: link to {target!r} does not resolve"


def test_markers_sit_right_above_a_block():
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, ln in enumerate(lines):
            if MARKER.match(ln):
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                assert FENCE.match(nxt), f"{path.name}:{i + 1}: a marker not followed by a code block"
