"""Hostile and broken inputs, one row each, through the real CLI in this process.

Each row builds its inputs in a fresh folder, runs ``memrope.runtime.cli.main`` and expects: its
exit code (2: bad input, found before the expensive work), exactly one line on stderr matching
its pattern (short: no value is printed whole), no traceback, and nothing written (the output
folder stays empty). The rows cover YAML alias bombs and deep nesting, oversized files, and
artifacts whose files are not the ones their contract pins. A last test runs a real
billion-laughs config in a child process under a 4 GB address-space limit.
(test_reliability.py has the faults that need a run to happen first: non-finite values, a full
disk, leftovers of a killed run.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from test_integrity import (
    _contract,
    _edit_in_place,
    _externalise,
    _largest_weights,
    _pin,
    _swap_weights,
    _write_contract,
)

from memrope.runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
MAX_LINE_CHARS = 600  # a message names a path or two and the rule; never a value whole


class Inputs:
    """A fresh folder of inputs for one row, and the command lines that use them."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self._request = tmp, request
        self.out = tmp / "out" / "latents.safetensors"
        self.garbage = self.file("garbage.pt", b"not a checkpoint")  # exists: only loading it would fail

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def sparse(self, name: str, size: int) -> Path:
        path = self.tmp / name
        with open(path, "wb") as handle:
            handle.truncate(size)
        return path

    def config(self, extra: str = "", drop: str = "") -> Path:
        text = (GOLDEN / "memrope_ema.yaml").read_text()
        return self.file("run.yaml", (text.replace(drop, "") if drop else text) + extra)

    def generate(self, *extra: str, config: Path | None = None) -> list[str]:
        """``generate`` with the golden tiny model whose checkpoint cannot load: a row whose check
        did not come first would fail on the checkpoint instead. The text comes from ``extra``'s
        ``--prompts`` when given, else from the golden embeddings."""
        text = [] if "--prompts" in extra else ["--text-embeds", str(GOLDEN / "inputs.safetensors")]
        return ["generate", "--no-decode", "--no-progress", "--checkpoint", str(self.garbage),
                "--model-config", str(GOLDEN / "config.json"), "--config", str(config or GOLDEN / "memrope_ema.yaml"),
                *text, "--noise", str(GOLDEN / "inputs.safetensors"), "--latents-out", str(self.out), *extra]

    def artifact(self, external: bool = False) -> Path:
        art = self.tmp / "art"
        shutil.copytree(self._request.getfixturevalue("artifacts")["memrope_ema"], art)
        if external:
            _externalise(art)
        return art

    def engine(self, art: Path, *extra: str) -> list[str]:
        return ["generate", "--no-decode", "--no-progress", "--engine", str(art), "--backend", "onnxruntime",
                "--config", str(GOLDEN / "memrope_ema.yaml"), "--text-embeds", str(GOLDEN / "inputs.safetensors"),
                "--noise", str(GOLDEN / "inputs.safetensors"), "--latents-out", str(self.out), *extra]

    def timeline_config(self) -> Path:
        return self.config("switch_frame_indices: 6, 12\n")


def laughs(levels: int, width: int = 9, base: int = 9, key: str = "l") -> str:
    """YAML lines where ``{key}{levels}`` stands for base * width ** levels strings."""
    lines = [f"{key}0: &{key}0 [{', '.join(['lol'] * base)}]"]
    lines += [f"{key}{i}: &{key}{i} [{', '.join([f'*{key}{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _timeline_bomb(inputs: Inputs) -> list[str]:
    """369 bytes standing for 9**7 prompts (the probe's was 357)."""
    lines = ["- {frame: 0, prompt: &a [x,x,x,x,x,x,x,x,x]}"]
    lines += [f"- {{frame: {i}, prompt: &{b} [{','.join([f'*{a}'] * 9)}]}}" for i, (a, b) in enumerate(zip("abcdef", "bcdefg", strict=True), 1)]
    timeline = inputs.file("timeline.yaml", "\n".join(lines) + "\n")
    assert timeline.stat().st_size < 400
    return inputs.generate("--prompts", str(timeline))


def _pin_removed(inputs: Inputs) -> list[str]:
    art = inputs.artifact()
    _swap_weights(art / "step.onnx")
    doc = _contract(art)
    del doc["files"]["step.onnx"]
    _write_contract(art, doc)
    return inputs.engine(art, "--verify-artifact")


def _pinned_elsewhere(name: str) -> Callable[[Inputs], list[str]]:
    def build(inputs: Inputs) -> list[str]:
        art = inputs.artifact()
        doc = _contract(art)
        doc["files"][name] = _pin(Path(name) if name.startswith("/") else art / "step.onnx")
        _write_contract(art, doc)
        return inputs.engine(art)

    return build


def _edited(external: bool, *extra: str) -> Callable[[Inputs], list[str]]:
    def build(inputs: Inputs) -> list[str]:
        art = inputs.artifact(external)
        weights = _largest_weights(onnx.load(str(art / "step.onnx"))).raw_data
        _edit_in_place(art / ("step.onnx.data" if external else "step.onnx"), weights)
        return inputs.engine(art, *extra)

    return build


def _external_unpinned(inputs: Inputs) -> list[str]:
    art = inputs.artifact(external=True)
    doc = _contract(art)
    del doc["files"]["step.onnx.data"]
    _write_contract(art, doc)
    return inputs.engine(art)


def _contract_replaced(data: Callable[[Inputs], bytes]) -> Callable[[Inputs], list[str]]:
    def build(inputs: Inputs) -> list[str]:
        art = inputs.artifact()
        (art / "contract.json").write_bytes(data(inputs))
        return inputs.engine(art)

    return build


def _huge_contract(inputs: Inputs) -> list[str]:
    art = inputs.artifact()
    (art / "contract.json").unlink()
    shutil.move(inputs.sparse("contract.json", 17 << 20), art / "contract.json")
    return inputs.engine(art)


@dataclass(frozen=True)
class Fault:
    name: str
    argv: Callable[[Inputs], list[str]]
    code: int
    message: str  # a regex the one stderr line must match (re.search)


DEEP = "[" * 100_000 + "]" * 100_000

FAULTS = [
    # Configs and prompt files: YAML aliases, nesting, sizes.
    Fault("config-billion-laughs", lambda i: i.generate(config=i.config(laughs(7) + "seed: *l7\n", drop="seed: 0\n")),
          2, r"run config .*run\.yaml uses 64 YAML aliases \(\*name\); at most 32 are accepted$"),
    Fault("config-few-aliases-many-values",
          lambda i: i.generate(config=i.config(laughs(3, width=10, base=1000) + "seed: *l3\n", drop="seed: 0\n")),
          2, r"run\.yaml: YAML aliases expand it to more than 100,000 values \(or into itself\)"),
    Fault("config-recursive-alias", lambda i: i.generate(config=i.config("x: &x [*x]\n")),
          2, r"run\.yaml: YAML aliases expand it to more than 100,000 values \(or into itself\)"),
    Fault("config-nested-100000-deep", lambda i: i.generate(config=i.config(f"x: {DEEP}\n")),
          2, r"run config .*run\.yaml is nested too deeply to read"),
    Fault("config-5000-digit-seed", lambda i: i.generate(config=i.config(f"seed: {'7' * 5000}\n", drop="seed: 0\n")),
          2, r"run config .*run\.yaml is not valid YAML: Exceeds the limit \(4300 digits\)"),
    Fault("config-long-string-value", lambda i: i.generate(config=i.config(f"seed: {'x' * 500_000}\n", drop="seed: 0\n")),
          2, r"seed must be an integer, got 'x+\.\.\.x+'$"),
    Fault("config-over-1-mib", lambda i: i.generate(config=i.config("#" * (1 << 20) + "\n")),
          2, r"run config .*run\.yaml is larger than 1 MiB, the most read for a run config$"),
    Fault("config-dev-zero", lambda i: i.generate(config=Path("/dev/zero")),
          2, r"run config /dev/zero is larger than 1 MiB"),
    Fault("timeline-billion-laughs", _timeline_bomb,
          2, r"prompt timeline .*timeline\.yaml uses 54 YAML aliases"),
    Fault("jsonl-nested-100000-deep",
          lambda i: i.generate("--prompts", str(i.file("p.jsonl", DEEP + "\n")), config=i.timeline_config()),
          2, r"p\.jsonl line 1 is nested too deeply to read"),
    Fault("jsonl-over-16-mib",
          lambda i: i.generate("--prompts", str(i.sparse("p.jsonl", 17 << 20)), config=i.timeline_config()),
          2, r"prompt file .*p\.jsonl is larger than 16 MiB"),
    # Artifacts whose files are not the ones their contract pins.
    Fault("artifact-pin-removed-graph-swapped", _pin_removed,
          2, r"contract\.json pins no step\.onnx \(the step graph runs from it\)"),
    Fault("artifact-pin-outside", _pinned_elsewhere("../other/step.onnx"),
          2, r"contract\.json pins '\.\./other/step\.onnx', which is not a plain file name inside the artifact"),
    Fault("artifact-pin-absolute", _pinned_elsewhere("/etc/hostname"),
          2, r"contract\.json pins '/etc/hostname', which is not a plain file name inside the artifact"),
    Fault("artifact-graph-edited-mtime-kept", _edited(external=False),
          2, r"step\.onnx differs from the file the export wrote \(SHA-256 mismatch\)"),
    Fault("artifact-weights-edited-mtime-kept", _edited(external=True),
          2, r"step\.onnx\.data differs from the file the export wrote \(SHA-256 mismatch\)"),
    Fault("artifact-weights-edited-verify", _edited(True, "--verify-artifact"),
          2, r"step\.onnx\.data differs from the file the export wrote"),
    Fault("artifact-weights-unpinned", _external_unpinned,
          2, r"step\.onnx loads step\.onnx\.data, which contract\.json does not pin"),
    Fault("artifact-contract-over-16-mib", _huge_contract,
          2, r"artifact contract .*contract\.json is larger than 16 MiB"),
    Fault("artifact-contract-nested-100000-deep", _contract_replaced(lambda i: DEEP.encode()),
          2, r"artifact contract .*contract\.json is nested too deeply to read"),
    Fault("artifact-contract-alias-free-but-huge-number",
          _contract_replaced(lambda i: b'{"contract_version": ' + b"9" * 5000 + b"}"),
          2, r"artifact contract .*contract\.json is not valid JSON: Exceeds the limit"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault, tmp_path, request, capsys):
    inputs = Inputs(tmp_path, request)
    argv = fault.argv(inputs)
    capsys.readouterr()
    assert main(argv) == fault.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[:2000]
    line = lines[0]
    assert line.startswith(f"memrope {argv[0]}: error: ") and len(line) <= MAX_LINE_CHARS, line[:2000]
    assert re.search(fault.message, line), line
    assert not inputs.out.parent.exists() or not any(inputs.out.parent.iterdir())


def test_a_billion_laughs_config_stays_small(tmp_path):
    """A 1.5 KB config whose seed: stands for 9**9 strings (a 6 GB error message before) fails at
    once, in one short line, inside a 4 GB address space."""
    config = tmp_path / "laughs.yaml"
    config.write_text((GOLDEN / "memrope_ema.yaml").read_text().replace("seed: 0\n", "") + laughs(8) + "seed: *l8\n")
    assert config.stat().st_size < 2000
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            "from memrope.runtime.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = ["generate", "--no-decode", "--checkpoint", str(GOLDEN / "tiny_selfforcing.pt"), "--model-config",
            str(GOLDEN / "config.json"), "--config", str(config), "--latents-out", str(tmp_path / "out.safetensors")]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr) < MAX_LINE_CHARS and "YAML aliases" in proc.stderr, proc.stderr[:2000]
    assert not (tmp_path / "out.safetensors").exists()
