#!/usr/bin/env bash
# Data- and expert-parallel training on one or more nodes with torchrun; extra arguments are --key value
# overrides of the config.
#   NPROC=8 bash launch/torchrun.sh configs/125M_structmoe.yml
# Two nodes of 8 GPUs (16 ranks), the experts split over the 8 GPUs of each node, ZeRO stage 1; the same
# command on every node, only NODE_RANK differs (0 on node0, 1 on the other):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 bash launch/torchrun.sh configs/410M_structmoe.yml \
#     --moe_expert_parallel_size 8 --zero_stage 1
# moe_expert_parallel_size must divide NNODES x NPROC and be at most moe_num_experts. Ranks are numbered
# node by node and EP groups are consecutive ranks, so with EP <= NPROC the token exchange stays inside a
# node; the 16 / 8 = 2 ranks holding the same experts (one per node) average their gradients.
# train_batch_size is global: gradient_accumulation_steps is derived from it and the number of ranks.
# MASTER_ADDR must be an address of node 0 that the others can reach; MASTER_PORT (29500) must be free.
# If a rank dies, torchrun stops the others on its node and the other nodes' ranks fail at their next
# collective; a rank that hangs makes the others fail after distributed_timeout_minutes (default 10), naming it.
# To survive losing a node (restart at the smaller world from the latest checkpoint): launch/torchrun_elastic.sh.
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
