#!/usr/bin/env bash
# Elastic training with torchrun: losing a node does not end the run. Run the same command on every node:
#   MIN_NODES=1 MAX_NODES=2 RDZV_ENDPOINT=node0:29400 RUN_ID=moe410m NPROC=8 \
#     bash launch/torchrun_elastic.sh configs/410M_structmoe.yml --moe_expert_parallel_size 8
# The nodes meet at RDZV_ENDPOINT (c10d rendezvous; the node of that address holds the store, so that node must
# stay up) and train as one group. When a node's agent dies (the node crashed or was taken away), the other
# ranks' next collective fails, their agents stop them and meet again without it: once at least MIN_NODES are
# there, train.py starts again at the smaller world and resumes from the config's `load` folder (`latest`; set
# `save` and `load` to the same folder), up to MAX_RESTARTS times. A node started later joins the same way.
# The global batch stays: set train_batch_size and train_micro_batch_size_per_gpu and leave
# gradient_accumulation_steps out; it is derived from the world at each start (train_batch_size / (micro x
# ranks)), and a world it does not divide is refused with one line. moe_expert_parallel_size must divide every
# world the run may shrink to (EP = NPROC does); otherwise that restart is refused with one line naming it.
# RDZV_CONF passes torchrun's rendezvous settings, e.g. RDZV_CONF=last_call_timeout=10,keep_alive_interval=2
# (a dead node is dropped after keep_alive_interval x keep_alive_max_attempt seconds, 5 x 3 by default).
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13's shared store, a node joining a running group hangs the new
# round (rank 0 of the old group does not publish MASTER_ADDR again; measured); without it, rank 0 of each group
# holds the group's store.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec torchrun \
  --nnodes="${MIN_NODES:-1}:${MAX_NODES:-2}" \
  --nproc_per_node="${NPROC:-2}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="${RDZV_ENDPOINT:-127.0.0.1:29400}" \
  --rdzv_id="${RUN_ID:-megatron}" \
  ${RDZV_CONF:+--rdzv_conf="$RDZV_CONF"} \
  train.py "$@"
