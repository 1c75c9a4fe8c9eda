"""Every command the README shows runs as written.

The README's ```bash blocks are extracted in order and run, each as one bash script (``-euo
pipefail``), from a scratch folder that sees the repository's files (``tests/``, ``docs/``) by
relative path, with a fresh ``$MEMROPE_CACHE``:
`pip install` steps (CI runs those, in a new virtual environment) and the test command itself
are left out. Running them takes minutes, so this runs in CI's slow step (``pytest -m slow``).
A block that fails shows its script and output.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Each README block gets this long; the slowest demo-sized one (an export) takes about a minute.
COMMAND_TIMEOUT_S = 600


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comments and blank lines dropped."""
    blocks = []
    for match in re.finditer(r"```bash\n(?P<body>.*?)```", text, re.S):
        joined = match.group("body").replace("\\\n", " ")
        commands = []
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(line)
        blocks.append(commands)
    return blocks


def runnable(command: str) -> list[str]:
    """The parts of ``command`` this test runs (``a && b`` split; installs and the test command
    itself dropped)."""
    parts = [p.strip() for p in command.split("&&")]
    keep = []
    for part in parts:
        words = shlex.split(part)
        if words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"] or words[:2] == ["bash", ".ci/run"]:
            continue
        keep.append(part)
    return keep


def test_the_readme_has_commands_and_every_one_is_reachable():
    blocks = readme_blocks(README.read_text())
    commands = [c for cs in blocks for c in cs]
    assert len(commands) >= 8, "the README shows almost no commands: the extraction broke"
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e") and "memrope generate" in commands[0]
    assert commands[1] == "python -m pytest -q"


def _scratch(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    for name in ("tests", "docs", "bench"):
        (work / name).symlink_to(ROOT / name)
    return work


def _run_blocks(tmp_path_factory) -> int:
    """Run each block as one bash script (so ``cmd &`` ... ``kill %1`` work as a reader would
    type them), stopping at the first failing command; background jobs are killed at its end."""
    work = _scratch(tmp_path_factory)
    env = dict(os.environ, MEMROPE_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if shutil.which("memrope", path=env["PATH"]) is None:
        pytest.skip("the memrope console script is not installed in this environment (pip install -e .)")
    ran = 0
    for commands in readme_blocks(README.read_text()):
        parts = [part for command in commands for part in runnable(command)]
        if not parts:
            continue
        script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\nset -x\n" + "\n".join(parts) + "\n"
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{script}\n" \
                                     f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        ran += len(parts)
    return ran


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path_factory):
    """Every block (minutes: exports, builds, a served session, a benchmark): CI runs it in its
    slow step."""
    assert _run_blocks(tmp_path_factory) >= 20
