"""The requirements the Docker image installs, for the base image it is built on (see ../Dockerfile).

    python launch/docker_requirements.py requirements-dev.txt > /tmp/req.txt && pip install -r /tmp/req.txt

Why: on a CPU base (python:3.11-slim) torch comes from requirements.txt's pin; on a CUDA PyTorch base the image
must keep the base's torch, or `pip install -r` replaces the CUDA build with the pinned wheel. So where this
interpreter already has a torch, the pin is swapped for `torch==<that version>`, which pip finds satisfied and
which stops any other requirement from moving torch; a base torch outside the project's supported range
(pyproject.toml's `torch>=...,<...`) is refused in one line. Standard library only: it runs before any install.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's lines, `-r` includes followed, comments and blank lines dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(path.parent / line[3:].strip())
        elif line:
            lines.append(line)
    return lines


def is_torch(line: str) -> bool:
    return re.split(r"[ <>=!~\[;]", line, maxsplit=1)[0].strip().lower() == "torch"


def supported_range(pyproject: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lowest, first unsupported) torch release from pyproject.toml's `"torch>=A,<B"` dependency."""
    found = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject.read_text())
    if not found:
        raise SystemExit(f"docker_requirements.py: {pyproject}: no \"torch>=A,<B\" dependency to check torch against")
    return release(found.group(1)), release(found.group(2))


def release(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def image_requirements(lines: list[str], base_torch: str | None, supported: tuple[tuple[int, ...], tuple[int, ...]],
                       ) -> list[str]:
    """`lines` as they are where the base has no torch; else with the torch pin replaced by the base's version."""
    if base_torch is None:
        return lines
    low, high = supported
    if not low <= release(base_torch) < high:
        raise SystemExit(f"docker_requirements.py: the base image's torch {base_torch} is outside the supported "
                         f"torch>={'.'.join(map(str, low))},<{'.'.join(map(str, high))} (pyproject.toml); "
                         f"pick a BASE with torch in that range")
    return [line for line in lines if not is_torch(line)] + [f"torch=={base_torch}"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python launch/docker_requirements.py REQUIREMENTS_FILE", file=sys.stderr)
        return 2
    requirements = Path(argv[0])
    supported = supported_range(requirements.parent / "pyproject.toml")
    base_torch = installed_torch()
    print("\n".join(image_requirements(requirement_lines(requirements), base_torch, supported)))
    kept = f"keeps the base's torch {base_torch}" if base_torch else "installs torch from the requirements"
    print(f"docker_requirements.py: the image {kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
