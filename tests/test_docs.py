"""Every fenced Python block of README.md and docs/*.md runs, as written, on the CPU (so the manual cannot rot).

A block that cannot run here (a GPU, a real checkpoint, files the reader has and the test has not) is preceded by
``<!-- not run: REASON -->``; the reason is required. Each runnable block runs alone in a fresh interpreter, in a
temporary working directory, offline, under a time limit.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
PYTHON = {"python", "py", "python3", "pycon"}
SKIP = re.compile(r"^\s*<!--\s*not run:(.*?)-->\s*$")
BLOCK_SECONDS = 60  # one block; the runnable ones use the tiny random world and take ~10 s each


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked not run ("" when the marker gives none)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The page's fenced Python blocks, each with the not-run reason of the marker just above it (if any)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    found, index, previous = [], 0, ""
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            if lines[index].strip():
                previous = lines[index]
            index += 1
            continue
        start, indent, info = index, fence.group(1), fence.group(2)
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        if index == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: a code fence that is never closed")
        if info.lower() in PYTHON:
            body = [line[len(indent):] if line.startswith(indent) else line for line in lines[start + 1:index]]
            marker = SKIP.match(previous)
            found.append(Block(path.relative_to(root).as_posix(), start + 1, textwrap.dedent("\n".join(body)),
                               marker.group(1).strip() if marker else None))
        previous, index = lines[index], index + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [block for block in ALL if block.skip is None]


def test_markers_sit_on_python_blocks_and_give_reasons():
    """Every ``not run`` marker is directly above a Python block and says why; none is empty or stray."""
    skipped = [block for block in ALL if block.skip is not None]
    assert [block.id for block in skipped if not block.skip] == [], "a not-run marker without a reason"
    markers = sum(len(SKIP.findall(line)) for page in PAGES
                  for line in page.read_text(encoding="utf-8").split("\n"))
    assert markers == len(skipped), "a <!-- not run: ... --> marker that is not directly above a ```python block"
    # the manual's own examples are there and most are run; what is skipped is said, block by block
    assert len(RUNNABLE) >= 3 and len(skipped) >= 1
    print(f"{len(RUNNABLE)} blocks run, {len(skipped)} not run:\n" +
          "\n".join(f"  {block.id}: {block.skip}" for block in skipped))


def test_block_parser_honours_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- not run: needs a GPU -->\n```python\nimport torch\n```\n\n```bash\nls\n```\n"
                    "- a list\n\n  ```py\n  x = 1\n    y = 2\n  ```\n```python\n```\n")
    found = blocks(page, root=tmp_path)
    assert [(block.line, block.skip, block.code) for block in found] == [
        (4, "needs a GPU", "import torch"), (13, None, "x = 1\n  y = 2"), (17, None, "")]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_block_runs(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=BLOCK_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id}: the block ran past {BLOCK_SECONDS} s")
    assert done.returncode == 0, (f"{block.id} failed (mark it <!-- not run: reason --> only if it cannot run on a "
                                  f"CPU):\n{block.code}\n--- stderr:\n{done.stderr[-4000:]}")


LINK = re.compile(r"\]\(([^)\s]+)\)")
# Pages the README links to that another branch writes. Once one lands here, this test fails until its name is
# taken out of this set: the set can only shrink (empty now: docs/COMFYUI.md has landed).
NOT_YET_MERGED: set[str] = set()


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_relative_links_resolve():
    """Every relative link of the manual names a file that exists, and every #anchor a heading of its page."""
    broken, checked = [], 0
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: outside this repository
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            name = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            if name in NOT_YET_MERGED:
                continue
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == [] and checked >= 20
    assert [name for name in NOT_YET_MERGED if (ROOT / name).exists()] == [], "merged: take it out of NOT_YET_MERGED"
