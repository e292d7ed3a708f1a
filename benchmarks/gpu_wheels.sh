#!/usr/bin/env bash
# Downloads into .gpu_wheels/ the wheels the lent GPU node lacks for this project's imports, so that
# benchmarks/gpu_check.py (which installs them with `pip install --no-index --no-deps --target`) runs there with
# no package registry. Run it on a machine with PyPI; the folder travels with the repo (the device tool's
# `carry`, or a copy of the repo with it).
#
#   bash benchmarks/gpu_wheels.sh              # pydantic (+ its deps), tqdm: what `import train` needs
#   bash benchmarks/gpu_wheels.sh --digits     # also scikit-learn (+ scipy, joblib, threadpoolctl), ~50 MB:
#                                              # the DiT digits dataset; without it gpu_check's dit_step
#                                              # trains on synthetic latents of the same shape
# (on the lent GPU machine, whose list is gpu_node_packages.txt, only pydantic and its three dependencies are
# missing: ~2.5 MB; the rest is skipped, and said so)
#
# What the node already has is not downloaded (it would replace the node's own version, and the carried tree
# is limited to 64 MiB): the node's packages are listed in benchmarks/gpu_node_packages.txt (GPU_NODE_PACKAGES
# names another list), read through benchmarks/gpu_node.py, which says which packages it skipped and which
# requirements of the downloaded wheels the node fills, and fails naming any requirement nobody fills.
# Versions are pinned to the ones the CPU CI tests with; the target is CPython 3.12 on manylinux x86_64
# whatever this machine is. GPU_WHEELS_DEST names another folder than .gpu_wheels.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS_DEST:-.gpu_wheels}
PACKAGES=(
  "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types==0.7.0" "typing-inspection==0.4.2"
  "typing-extensions==4.16.0" "tqdm==4.70.1"
)
if [[ "${1:-}" == "--digits" ]]; then
  PACKAGES+=("scikit-learn==1.9.1" "scipy==1.17.1" "joblib==1.6.0" "threadpoolctl==3.8.0")
elif [[ -n "${1:-}" ]]; then
  echo "gpu_wheels.sh: unknown option $1; expected --digits or nothing" >&2
  exit 2
fi

mkdir -p "$DEST"
mapfile -t WANTED < <(python benchmarks/gpu_node.py not-on-node "${PACKAGES[@]}")
if ((${#WANTED[@]})); then
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${WANTED[@]}"
fi

# every requirement of what was downloaded is either here or on the node
python benchmarks/gpu_node.py check-wheels "$DEST"
du -sh "$DEST"
ls "$DEST"
