#!/usr/bin/env bash
# Downloads into .gpu_wheels/ the wheels a bare GPU node lacks for this project's imports, so that
# benchmarks/gpu_check.py (which installs them with `pip install --no-index --no-deps`) runs there with no
# package registry. Run it on a machine with PyPI, then copy .gpu_wheels/ along with the repo.
#
#   bash benchmarks/gpu_wheels.sh              # pydantic (+ its deps) and tqdm: what `import train` needs
#   bash benchmarks/gpu_wheels.sh --digits     # also scikit-learn (+ scipy, joblib, threadpoolctl), ~50 MB:
#                                              # the DiT digits dataset; without it gpu_check's dit_step
#                                              # trains on synthetic latents of the same shape
#
# Why these: the node has Python 3.12, torch+CUDA, transformers, triton, numpy, safetensors, tokenizers,
# sentencepiece, matplotlib (so Pillow), pyyaml and pytest. Of the project's module-level imports, pydantic
# (megatron/config/schema.py, loader.py) and tqdm (megatron/training/trainer.py, megatron/data/preprocess.py)
# are missing; tensorboard, wandb and pyarrow are imported only when a config asks for them, and
# scikit-learn only for the digits dataset. Versions are pinned to the ones the CPU CI tests with; the
# target is CPython 3.12 on manylinux x86_64 whatever this machine is.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PACKAGES=(
  "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types==0.7.0" "typing-inspection==0.4.2"
  "typing-extensions==4.16.0" "tqdm==4.70.1"
)
if [[ "${1:-}" == "--digits" ]]; then
  PACKAGES+=("scikit-learn==1.9.1" "scipy==1.17.1" "joblib==1.6.0" "threadpoolctl==3.8.0")
fi

mkdir -p "$DEST"
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"

# every requirement of what was downloaded is either here or on the node: checked against the node's list
python - "$DEST" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

ON_NODE = {"torch", "numpy", "pyyaml", "transformers", "triton", "safetensors", "tokenizers", "sentencepiece",
           "matplotlib", "pillow", "pytest", "packaging", "filelock", "jinja2", "networkx", "sympy", "fsspec"}
folder = Path(sys.argv[1])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(w.name.split("-")[0]) for w in folder.glob("*.whl")}
missing = set()
for wheel in folder.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                requirement = line.split(":", 1)[1].split(";")[0].strip()
                marker = line.split(";", 1)[1] if ";" in line else ""
                if "sys_platform == \"win32\"" in marker or "platform_system == \"Windows\"" in marker:
                    continue
                name = norm(re.split(r"[ <>=!~\[(]", requirement, maxsplit=1)[0])
                if name not in have and name not in ON_NODE:
                    missing.add(f"{name} (for {wheel.name})")
if missing:
    sys.exit("gpu_wheels: not downloaded and not on the node: " + ", ".join(sorted(missing)))
EOF
du -sh "$DEST"
ls "$DEST"
