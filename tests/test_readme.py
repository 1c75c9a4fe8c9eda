"""Every command the README and the docs/ pages show runs as written.

The ```bash blocks of ``README.md`` and of every ``docs/*.md`` page are extracted in order and
run, page by page, each block as one bash script (``-euo pipefail``), from a scratch folder that
sees the repository's files (``tests/``, ``docs/``, ``bench/``) by relative path, with a fresh
``$MEMROPE_CACHE``. Installs (``pip install``, ``apt-get``; CI runs those, in a new virtual
environment) and the test commands themselves are left out. A block whose first line is
``# Needs a CUDA GPU`` runs only where PyTorch sees one. The README's ```python blocks run as one
script in the same kind of scratch folder. Running them takes minutes, so they run in CI's slow
step (``pytest -m slow``); the default suite checks the extraction, the links between the pages
and that ``.ci/run`` runs the README's commands as written. A block that fails shows its script
and output.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CI = ROOT / ".ci" / "run"
GPU_BLOCK = "# Needs a CUDA GPU"
# Each block gets this long; the slowest demo-sized one (an export) takes about a minute.
COMMAND_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    commands: list[str]
    gpu: bool  # its first line is GPU_BLOCK: run only where PyTorch sees a CUDA GPU


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang blocks of ``text``, in order."""
    return [m.group("body") for m in re.finditer(rf"^```{lang}\n(?P<body>.*?)^```", text, re.S | re.M)]


def bash_blocks(text: str) -> list[Block]:
    """The commands of each ```bash block: continuation lines joined, comments and blank lines dropped."""
    blocks = []
    for body in fenced(text, "bash"):
        joined = body.replace("\\\n", " ")
        commands = []
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
        blocks.append(Block(commands, gpu=body.startswith(GPU_BLOCK)))
    return blocks


def readme_blocks(text: str) -> list[list[str]]:
    return [block.commands for block in bash_blocks(text)]


def runnable(command: str) -> list[str]:
    """The parts of ``command`` this test runs (``a && b`` split; installs and the test commands
    themselves dropped)."""
    if re.search(r"\bapt-get\b", command):  # a system package, installed by CI (needs root)
        return []
    keep = []
    for part in (p.strip() for p in command.split("&&")):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"] or words[:2] == ["bash", ".ci/run"]:
            continue
        keep.append(part)
    return keep


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _pages_with(gpu: bool) -> list[Path]:
    return [page for page in PAGES
            if any(runnable(c) for block in bash_blocks(page.read_text()) if block.gpu == gpu for c in block.commands)]


def test_the_readme_has_commands_and_every_one_is_reachable():
    blocks = readme_blocks(README.read_text())
    commands = [c for cs in blocks for c in cs]
    assert len(commands) >= 6, "the README shows almost no commands: the extraction broke"
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e") and "memrope generate" in commands[0]
    assert commands[1] == "python -m pytest -q"
    assert len(README.read_text().splitlines()) <= 200, "the README is a front page: details go to docs/"
    pages = {_name(page) for page in _pages_with(gpu=False)}
    assert {"README.md", "docs/generate.md", "docs/export_and_engines.md", "docs/serving.md"} <= pages
    assert fenced(README.read_text(), "python"), "the README's Python example is gone"


def test_ci_runs_the_readme_commands_as_written():
    """``.ci/run``: the README's two commands one after the other (nothing installed between
    them), and it ends with the slow step's commands as docs/testing.md shows them."""
    ci = [line.strip() for line in CI.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    first, second = readme_blocks(README.read_text())[0][:2]
    assert first in ci, ".ci/run does not run the README's first command as written"
    assert ci[ci.index(first) + 1] == second, "the README's second command must follow its first in .ci/run"
    slow = [c for cs in readme_blocks((ROOT / "docs" / "testing.md").read_text()) for c in cs if c != second]
    assert slow and slow[-1] == "python -m pytest -q -m slow -n 0"
    assert ci[-len(slow):] == slow, "the slow step in .ci/run differs from docs/testing.md's"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    broken = []
    for page in PAGES:
        text = page.read_text()
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_name(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.sub(r"^```.*?^```", "", dest.read_text(), flags=re.S | re.M)
                slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", headings, re.M)}
                if anchor not in slugs:
                    broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _scratch(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    for name in ("tests", "docs", "bench"):
        (work / name).symlink_to(ROOT / name)
    return work


def _env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ, MEMROPE_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if shutil.which("memrope", path=env["PATH"]) is None:
        pytest.skip("the memrope console script is not installed in this environment (pip install -e .)")
    return env


def _run_blocks(page: Path, tmp_path_factory, *, gpu: bool) -> int:
    """Run each of ``page``'s blocks (those that need a GPU, or the others) as one bash script (so
    ``cmd &`` ... ``kill %1`` work as a reader would type them), stopping at the first failing
    command; background jobs are killed at its end."""
    env = _env(tmp_path_factory)
    work = _scratch(tmp_path_factory)
    ran = 0
    for block in bash_blocks(page.read_text()):
        parts = [part for command in block.commands for part in runnable(command)]
        if block.gpu != gpu or not parts:
            continue
        script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\nset -x\n" + "\n".join(parts) + "\n"
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"{_name(page)} block failed ({proc.returncode}):\n{script}\n" \
                                     f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        ran += len(parts)
    return ran


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with(gpu=False), ids=_name)
def test_every_command_runs_as_written(page, tmp_path_factory):
    """Every block of a page (minutes: exports, builds, a served session, a benchmark): CI runs
    it in its slow step."""
    assert _run_blocks(page, tmp_path_factory, gpu=False) > 0


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("page", _pages_with(gpu=True), ids=_name)
def test_every_gpu_command_runs_as_written(page, tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none on this machine)")
    assert _run_blocks(page, tmp_path_factory, gpu=True) > 0


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path_factory):
    env = _env(tmp_path_factory)
    work = _scratch(tmp_path_factory)
    script = work / "readme_example.py"
    script.write_text("\n".join(fenced(README.read_text(), "python")))
    proc = subprocess.run([sys.executable, script.name], cwd=work, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"the README's Python example failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert (work / "out" / "triangle.mp4").stat().st_size > 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [str(b) for b in range(6)]
