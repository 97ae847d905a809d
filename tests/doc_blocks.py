"""The code blocks of README.md and docs/*.md, run as a reader runs them (no pytest needed).

Kinds of block, told by the fence and the HTML comment right above it:

* ```python: a program a reader pastes into a file. Its first line says what it needs
  installed, ``# needs: pip install tcpade`` or ``# needs: pip install 'tcpade[EXTRA]'``
  (an extra of pyproject.toml). Each block runs on its own, in a fresh Python process, in
  an empty temporary folder (not the repository root), so it must import what it uses.
* ```pycon: an interactive session (``>>>`` prompts); doctest runs it in a fresh process and
  every output line shown must be what Python prints. Its first line is a ``# needs:``
  comment too (``>>> # needs: pip install tcpade``).
* ``<!-- output: COMMAND -->`` above a fence: the block is what COMMAND prints (stdout),
  COMMAND run by bash in an empty temporary folder with this Python's ``bin/`` first on
  PATH (so ``tcpade`` and ``python`` are the installed ones). Wall-clock timings vary from
  run to run: in a table whose header has a ``wall speedup`` column that column is masked
  before comparing; everything else must match exactly.
* ``<!-- skip: REASON -->`` above a fence: not run (a download, a GPU); counted and reported.

    python tests/doc_blocks.py --write                    # rerun every output command, rewrite its block
    python tests/doc_blocks.py --check                    # run everything, report differences
    python tests/doc_blocks.py --snippets --needs tcpade,demo   # only the Python / pycon blocks
                                                          # whose install profile is among these

tests/test_docs.py runs the same functions under pytest.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(skip|output):\s*(.+?)\s*-->\s*$")
NEEDS = re.compile(r"^(?:>>> )?# needs: pip install (?:tcpade|'tcpade\[(\w+)\]')\s*$")
RUNNABLE = ("python", "pycon")
TIMEOUT = 900


@dataclass
class Block:
    path: Path
    line: int  # the first line of the block's body (1-based)
    end: int  # the line of the closing fence (1-based)
    lang: str
    source: str
    marker: Optional[str] = None  # "skip" or "output"
    argument: str = ""  # the skip reason or the output command

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> Optional[str]:
        """The install profile named by the block's first line: "tcpade" or the extra's name."""
        m = NEEDS.match(self.source.splitlines()[0]) if self.source.strip() else None
        if m is None:
            return None
        return m.group(1) or "tcpade"


def blocks(path: Path) -> List[Block]:
    out, lines = [], path.read_text().splitlines()
    i, marker = 0, None
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            marker = (m.group(1), m.group(2))
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            start, body = i + 2, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            kind, arg = marker or (None, "")
            out.append(Block(path, start, i + 1, f.group(1), "\n".join(body) + "\n", kind, arg))
            marker = None
        elif lines[i].strip():
            marker = None  # a marker applies to the very next block only
        i += 1
    return out


def all_blocks() -> List[Block]:
    return [b for p in DOCS for b in blocks(p)]


def _env(python: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PATH"] = os.path.dirname(os.path.abspath(python)) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_snippet(block: Block, python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run a python or pycon block in a fresh process in an empty folder."""
    with tempfile.TemporaryDirectory(prefix="tcpade-doc-") as tmp:
        if block.lang == "python":
            Path(tmp, "snippet.py").write_text(block.source)
            args = [python, "snippet.py"]
        else:
            Path(tmp, "session.txt").write_text(block.source)
            args = [python, "-m", "doctest", "-o", "NORMALIZE_WHITESPACE", "session.txt"]
        return subprocess.run(args, cwd=tmp, env=_env(python), capture_output=True, text=True, timeout=TIMEOUT)


def run_output(block: Block, python: str = sys.executable) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="tcpade-doc-") as tmp:
        return subprocess.run(["bash", "-c", block.argument], cwd=tmp, env=_env(python), capture_output=True,
                              text=True, timeout=TIMEOUT)  # fmt: skip


def mask(text: str) -> str:
    """The text with the wall-clock column of each table blanked (see the module docstring)."""
    out, end = [], None
    for line in text.splitlines():
        if "wall speedup" in line:
            end = line.index("wall speedup") + len("wall speedup")
        elif not line.strip():
            end = None
        elif end is not None and len(line) >= end:
            head = re.sub(r"\S+$", lambda m: "#" * len(m.group(0)), line[:end])
            line = head + line[end:]
        out.append(line)
    return "\n".join(out) + "\n"


def check_output(block: Block, python: str = sys.executable) -> Optional[str]:
    """None when the command still prints what the block shows, else a message."""
    r = run_output(block, python)
    if r.returncode != 0:
        return f"{block.where}: `{block.argument}` exited {r.returncode}:\n{r.stderr[-3000:]}"
    if mask(r.stdout) != mask(block.source):
        import difflib

        diff = "".join(difflib.unified_diff(mask(block.source).splitlines(True), mask(r.stdout).splitlines(True),
                                            "shown", "printed now"))  # fmt: skip
        return f"{block.where}: `{block.argument}` prints something else now (python tests/doc_blocks.py --write):\n{diff}"
    return None


def check_snippet(block: Block, python: str = sys.executable) -> Optional[str]:
    r = run_snippet(block, python)
    if r.returncode != 0:
        return f"{block.where} ({block.lang}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n---\n{block.source}"
    return None


def write_outputs(paths=DOCS, python: str = sys.executable) -> int:
    """Rerun every output command and rewrite its block; returns the number rewritten."""
    changed = 0
    for path in paths:
        lines = path.read_text().splitlines()
        for b in reversed([b for b in blocks(path) if b.marker == "output"]):
            r = run_output(b, python)
            if r.returncode != 0:
                raise SystemExit(f"{b.where}: `{b.argument}` exited {r.returncode}:\n{r.stderr[-3000:]}")
            new = r.stdout.rstrip("\n").splitlines()
            if lines[b.line - 1 : b.end - 1] != new:
                lines[b.line - 1 : b.end - 1] = new
                changed += 1
        path.write_text("\n".join(lines) + "\n")
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rerun every output command and rewrite its block")
    ap.add_argument("--check", action="store_true", help="run every block, report what fails or differs")
    ap.add_argument("--snippets", action="store_true", help="only the python / pycon blocks")
    ap.add_argument("--needs", default=None, help="comma-separated install profiles to run (tcpade,demo,...)")
    ap.add_argument("--python", default=sys.executable, help="the Python to run them with")
    a = ap.parse_args(argv)
    if a.write:
        print(f"rewrote {write_outputs(python=a.python)} output block(s)")
        return 0
    profiles = set(a.needs.split(",")) if a.needs else None
    failures, ran, skipped = [], 0, 0
    for b in all_blocks():
        if b.marker == "skip":
            skipped += 1
            continue
        if b.lang in RUNNABLE:
            if b.needs is None:
                failures.append(f"{b.where}: the first line does not say what the block needs installed")
                continue
            if profiles is not None and b.needs not in profiles:
                continue
            msg = check_snippet(b, a.python)
        elif b.marker == "output" and not a.snippets:
            msg = check_output(b, a.python)
        else:
            continue
        ran += 1
        print(f"{'FAIL' if msg else 'ok  '} {b.where} ({b.lang or 'output'})", flush=True)
        if msg:
            failures.append(msg)
    for f in failures:
        print(f, file=sys.stderr)
    print(f"documentation blocks: {ran} run, {len(failures)} failing, {skipped} marked skip")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
