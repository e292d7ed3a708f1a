"""What the lent GPU node has (benchmarks/gpu_node_packages.txt), and what this project must bring to it.

    python benchmarks/gpu_node.py not-on-node NAME==VERSION ...   # prints those not on the node, one a line
    python benchmarks/gpu_node.py check-wheels .gpu_wheels          # is every wheel's requirement there or on the node?
    python benchmarks/gpu_node.py replica-requirements              # pip requirements of the node's CPU replica
    python benchmarks/gpu_node.py installed-not-on-node             # what this interpreter has that the node lacks

Why: the node has no package registry, so whatever the GPU check imports must be on it already or travel as a
wheel in .gpu_wheels/. benchmarks/gpu_wheels.sh, benchmarks/gpu_replica.sh and tests/integration/test_gpu_check.py
all read the node's list through this file, so there is one list to keep true. GPU_NODE_PACKAGES names another
list (a node of your own).
"""

from __future__ import annotations

import ast
import os
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO / "launch") not in sys.path:  # the Docker build's reader of requirements files, a standalone script
    sys.path.insert(0, str(REPO / "launch"))
from docker_requirements import requirement_lines  # noqa: E402

NODE_LIST = HERE / "gpu_node_packages.txt"
# the two versions that decide the GPU check's code paths; the replica takes the rest from PyPI as it resolves them
REPLICA_PINS = ("torch", "transformers")
# import name -> distribution, where they differ, for what this project and its tests import
IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "google": "protobuf"}
# the project's own top-level modules (the repo root, benchmarks/, tools/, launch/ and tests/ are on the path when
# they run)
PROJECT_MODULES = {"megatron", "train", "tools", "helpers", "conftest",
                   *(p.stem for folder in (HERE, REPO / "tools", REPO / "launch") for p in folder.glob("*.py"))}


def norm(name: str) -> str:
    """A distribution's name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """'scikit-learn>=1.4  # comment' -> 'scikit-learn'."""
    return norm(re.split(r"[ <>=!~\[(;#]", requirement.strip(), maxsplit=1)[0])


def node_packages(path: Path | None = None) -> dict[str, str | None]:
    """{normalized name: version or None} from the node's list (GPU_NODE_PACKAGES, else gpu_node_packages.txt)."""
    path = Path(path or os.environ.get("GPU_NODE_PACKAGES") or NODE_LIST)
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[norm(name)] = version.strip() or None
    return packages


def wheel_distribution(wheel: Path) -> str:
    """'pydantic_core-2.46.4-cp312-....whl' -> 'pydantic-core'."""
    return norm(wheel.name.split("-", 1)[0])


def wheel_requirements(wheel: Path) -> list[str]:
    """The names a wheel requires on Linux (its METADATA's Requires-Dist, without extras and Windows-only ones)."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    names = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement, _, marker = line.split(":", 1)[1].partition(";")
        if "extra ==" in marker or 'sys_platform == "win32"' in marker or 'platform_system == "Windows"' in marker:
            continue
        names.append(requirement_name(requirement))
    return names


def check_wheels(folder: Path, node: dict[str, str | None]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(missing, on_node): each requirement of the folder's wheels that is neither among them nor on the node,
    and each one the node has, with the wheels that need it."""
    wheels = sorted(folder.glob("*.whl"))
    have = {wheel_distribution(w) for w in wheels}
    missing: dict[str, list[str]] = {}
    on_node: dict[str, list[str]] = {}
    for wheel in wheels:
        for name in wheel_requirements(wheel):
            if name in have:
                continue
            (on_node if name in node else missing).setdefault(name, []).append(wheel_distribution(wheel))
    return missing, on_node


def replica_requirements(node: dict[str, str | None], requirements: Path = REPO / "requirements-dev.txt") -> list[str]:
    """The project's requirements that the node has: torch and transformers at the node's versions, the rest as
    the project asks; what the node lacks (pydantic, wandb, ruff) is left out, as it is there."""
    lines = []
    for line in requirement_lines(requirements):
        name = requirement_name(line)
        if name not in node:
            continue
        lines.append(f"{name}=={node[name]}" if name in REPLICA_PINS and node[name] else line)
    return lines


def installed_not_on_node(node: dict[str, str | None]) -> list[str]:
    """The distributions this interpreter has and the node lacks (pip, setuptools and wheel aside): what a replica
    of the node must uninstall after pip has pulled them in as dependencies (pydantic, through typer)."""
    from importlib import metadata

    keep = {"pip", "setuptools", "wheel", "megatron-moe"}
    installed = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    return sorted(installed - set(node) - keep)


def module_imports(path: Path) -> set[str]:
    """Top-level module names a file imports when it is loaded: its module-level imports, also those inside
    top-level if/try blocks; not those inside functions (they run only if called)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            pending += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                        *(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)]
    return names


def imports_not_on_node(paths: list[Path], node: dict[str, str | None], wheels: set[str] = frozenset()) -> dict:
    """{module: [files]} for third-party modules the files import at load time that neither the node nor the
    wheels (normalized distribution names) provide."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for module in sorted(module_imports(path)):
            if module in sys.stdlib_module_names or module in PROJECT_MODULES or module == "__future__":
                continue
            distribution = norm(IMPORT_TO_DISTRIBUTION.get(module, module))
            if distribution not in node and distribution not in wheels:
                found.setdefault(module, []).append(str(path.relative_to(REPO)) if path.is_relative_to(REPO)
                                                    else str(path))
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    node = node_packages()
    command, args = argv[0], argv[1:]
    if command == "not-on-node":
        there = [a for a in args if requirement_name(a) in node]
        if there:
            print(f"gpu_node: already on the node, not downloaded: {', '.join(there)}", file=sys.stderr)
        print("\n".join(a for a in args if a not in there))
        return 0
    if command == "check-wheels":
        folder = Path(args[0])
        missing, on_node = check_wheels(folder, node)
        if on_node:
            print("gpu_node: required and already on the node: " +
                  ", ".join(f"{name} (for {', '.join(sorted(set(by)))})" for name, by in sorted(on_node.items())))
        extra = sorted({wheel_distribution(w) for w in folder.glob("*.whl")} & set(node))
        if extra:
            print(f"gpu_node: in {folder} but already on the node (not installed there): {', '.join(extra)}")
        if missing:
            print(f"gpu_node: required, not in {folder} and not on the node: " +
                  ", ".join(f"{name} (for {', '.join(sorted(set(by)))})" for name, by in sorted(missing.items())),
                  file=sys.stderr)
            return 1
        return 0
    if command == "installed-not-on-node":
        print("\n".join(installed_not_on_node(node)))
        return 0
    if command == "replica-requirements":
        print("\n".join(replica_requirements(node)))
        return 0
    print(f"gpu_node: unknown command {command!r}; expected not-on-node, check-wheels, replica-requirements or "
          "installed-not-on-node", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
