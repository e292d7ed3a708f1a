#!/usr/bin/env bash
# The oldest torch this project supports (pyproject.toml's lower bound), checked: build a scratch virtual
# environment with that torch (the published Linux wheel with its CUDA libraries, about 5.5 GB installed; it runs
# on a CPU) and the project's other requirements, then run the tests that touch what changed between torch
# releases: expert parallelism (collectives), the grouped-matmul kernels, FSDP2, checkpoints and the trainer.
#
#   bash tests/oldest_torch.sh [VENV_DIR]        # default VENV_DIR: /tmp/megatron-oldest-torch (reused if there)
#
# Long (a multi-GB download the first time, then ~5 minutes of tests): run by hand or as `pytest -m slow
# tests/integration/test_torch_range.py`, not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/megatron-oldest-torch}"
OLDEST=$(python3 -c "import re; print(re.search(r'\"torch>=([0-9.]+)', open('pyproject.toml').read()).group(1))")
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$OLDEST'))" 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==$OLDEST.*"
fi
grep -v '^torch==' requirements.txt > "$VENV/requirements-without-torch.txt"
"$PY" -m pip install --quiet --disable-pip-version-check -r "$VENV/requirements-without-torch.txt" pytest hypothesis
echo "torch $("$PY" -c 'import torch; print(torch.__version__)') in $VENV"
# the repo's own package on the path (no install: pyproject's torch range must not pull another torch)
PYTHONPATH="$PWD" "$PY" -m pytest -p no:cacheprovider -p no:warnings \
    tests/unit/test_moe_kernels.py tests/unit/test_moe_layer.py tests/unit/test_host_syncs.py \
    tests/unit/test_checkpoint.py tests/unit/test_compile.py \
    tests/integration/test_expert_parallel.py tests/integration/test_parallel.py \
    tests/integration/test_parallel_training.py tests/integration/test_async_save.py \
    tests/integration/test_trainer.py tests/integration/test_chunked_loss.py "${@:2}"
