#!/usr/bin/env bash
# Data-parallel training on one or more nodes with torchrun.
#   NPROC=8 bash launch/torchrun.sh configs/125M_structmoe.yml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 bash launch/torchrun.sh configs/...   (on each node)
# On a CPU machine the ranks talk over gloo; on GPUs over NCCL (chosen by the trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun \
  --nproc_per_node="${NPROC:-2}" \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" \
  train.py "$@"
