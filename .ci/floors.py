"""pyproject.toml's lower bounds are the oldest versions the project is tested with.

``python .ci/floors.py EXTRAS`` prints a pip constraints file pinning every direct dependency of
the package and of EXTRAS (comma-separated, e.g. ``onnx,video,dev``) that applies to this machine
to its floor (``name>=X`` -> ``name==X``). With ``--check`` it prints, on stderr, each one whose
installed version is not its floor, and exits 1 if there is any: then the default suite has not
run at the floors, and CI runs it again in an environment installed with these constraints.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def floors(extras: list[str]) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    out: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name == project["name"]:  # a self-reference such as memrope-engine[video]
            for extra in req.extras:
                out.update(floors([extra]))
            continue
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if not lower:
            raise SystemExit(f"pyproject.toml: {line!r} has no lower bound (>=); every dependency needs a floor")
        out[req.name] = lower[0]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", help="comma-separated extras, e.g. onnx,video,dev,rtx,serve")
    parser.add_argument("--check", action="store_true", help="exit 1 if an installed version is not its floor")
    args = parser.parse_args()
    pins = floors([e for e in args.extras.split(",") if e])
    if args.check:
        off = []
        for name, floor in sorted(pins.items()):
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "not installed"
            if installed == "not installed" or Version(installed.split("+")[0]) != Version(floor):
                off.append(f"{name}: installed {installed}, floor {floor}")
        for line in off:
            print(line, file=sys.stderr)
        return 1 if off else 0
    print("\n".join(f"{name}=={floor}" for name, floor in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
