#!/usr/bin/env bash
# Runs the GPU check in a CPU replica of the lent GPU node's Python, here (where PyPI is), so that an import or
# API mismatch with the node's packages shows on the CPU and not in the first GPU minute.
#
#   bash benchmarks/gpu_replica.sh [OUT] [gpu_check options]     # OUT defaults to /tmp/gpu_replica/out
#
# The replica is a venv of Python 3.12 (GPU_REPLICA_VENV, default /tmp/gpu_replica/venv; built once, ~5 GB) with
# torch 2.11.0 and transformers 5.17.0 as on the node, the project's other requirements that the node has
# (benchmarks/gpu_node_packages.txt, through benchmarks/gpu_node.py), the project installed with --no-deps, and
# nothing the node lacks: what pip pulled in beside them is uninstalled (pydantic, which typer requires, among
# them). PyPI's torch 2.11.0 for x86-64 Linux is the node's CUDA 13 build; `import torch` needs its CUDA
# libraries, so pip installs them with it (cuda-toolkit, nvidia-*), and with no GPU here it runs on the CPU.
# The check runs as the device tool runs it: in a copy of the tracked and untracked-not-ignored files, with
# .gpu_wheels/ carried beside them (made first if missing), as `python3 benchmarks/gpu_check.py --out OUT`. The
# script fails unless every section is ok and OUT holds the three result files alone.
# GPU_REPLICA_PYTHON names a Python 3.12 where neither python3.12 nor pyenv's is found.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
BASE=/tmp/gpu_replica
VENV=${GPU_REPLICA_VENV:-$BASE/venv}
OUT=$(realpath -m "${1:-$BASE/out}")
shift || true

PY=${GPU_REPLICA_PYTHON:-}
if [[ -z $PY ]]; then
  for candidate in python3.12 $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null); do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
fi
if [[ -z $PY ]]; then
  echo "gpu_replica.sh: no Python 3.12 (the node's) found; set GPU_REPLICA_PYTHON" >&2
  exit 1
fi

[[ -d .gpu_wheels ]] || bash benchmarks/gpu_wheels.sh
[[ -x $VENV/bin/python3 ]] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python3
echo "gpu_replica: venv $VENV ($("$VPY" --version))"
mapfile -t REQUIREMENTS < <("$VPY" benchmarks/gpu_node.py replica-requirements)
"$VPY" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" setuptools
mapfile -t EXTRA < <("$VPY" benchmarks/gpu_node.py installed-not-on-node)
if ((${#EXTRA[@]})); then
  echo "gpu_replica: not on the node, uninstalled: ${EXTRA[*]}"
  "$VPY" -m pip uninstall --quiet --disable-pip-version-check -y "${EXTRA[@]}"
fi

# the tree as the device tool sends it, and the carried wheels
mkdir -p "$BASE"
TREE=$(mktemp -d "$BASE/tree.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$TREE"
cp -r .gpu_wheels "$TREE/"
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$TREE"
"$VPY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pydantic") is not None)' ||
  { echo "gpu_replica.sh: pydantic imports in the replica; the node has none" >&2; exit 1; }
"$VPY" -c 'import torch, transformers; print(f"gpu_replica: torch {torch.__version__}, transformers "
  f"{transformers.__version__}, CUDA available: {torch.cuda.is_available()}")'

rm -rf "$OUT"
mkdir -p "$OUT"
status=0
(cd "$TREE" && env -u PYTHONPATH PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 \
  python3 benchmarks/gpu_check.py --out "$OUT" "$@") || status=$?
"$VPY" - "$OUT" "$status" <<'EOF'
import json
import sys
from pathlib import Path

out, status = Path(sys.argv[1]), int(sys.argv[2])
result = json.loads((out / "gpu_check.json").read_text())
bad = {name: s.get("error") or s.get("reason") for name, s in result["sections"].items() if s["status"] != "ok"}
files = sorted(p.name for p in out.iterdir())
print(f"gpu_replica: exit {status}, {result['seconds']:.0f} s, wheels: {result['wheels']}")
print(f"gpu_replica: files in {out}: {', '.join(files)}")
for name, problem in bad.items():
    print(f"gpu_replica: {name}: {problem}")
expected = ["gpu_check.json", "gpu_check.md", "gpu_check.png"]
sys.exit(1 if status or bad or files != expected else 0)
EOF
