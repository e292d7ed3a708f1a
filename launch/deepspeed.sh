#!/usr/bin/env bash
# GPT-NeoX-style multi-node launch with DeepSpeed's own launcher: this is just
#   deepspeed --hostfile "$HOSTFILE" $DS_ARGS train.py CONFIG [--key value ...]
#   HOSTFILE=/job/hostfile bash launch/deepspeed.sh configs/410M_structmoe.yml --moe_expert_parallel_size 8 --zero_stage 1
# The hostfile has one "hostname slots=N" line per node (N processes, one per GPU). deepspeed ssh-es into
# every host with pdsh, runs `python -m deepspeed.launcher.launch` there, and that starts N copies of
# `train.py --local_rank=i CONFIG ...` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set:
# train.py takes its rank from those and ignores --local_rank. The trainer, not DeepSpeed, does the
# data/expert parallelism and ZeRO (FSDP2); deepspeed is only the launcher (pip install deepspeed).
# Needs: passwordless ssh and pdsh between the nodes, this repo and the same Python environment at the same
# path on every node. Only PYTHON*/UCX*/MV2*/MLFLOW* (and NCCL* on GPUs) variables reach the other nodes;
# put others (OMP_NUM_THREADS, WANDB_API_KEY, ...) as KEY=value lines in ./.deepspeed_env or ~/.deepspeed_env.
# DS_ARGS passes launcher flags, e.g. DS_ARGS="--master_addr node0 --master_port 29501" or
# "--include node0:0,1"; on one machine without ssh: DS_ARGS="--no_ssh_check --master_addr 127.0.0.1".
# With no hostfile, deepspeed uses this machine's GPUs (CUDA_VISIBLE_DEVICES) only.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v deepspeed >/dev/null || { echo "deepspeed: command not found (pip install deepspeed)" >&2; exit 2; }
# shellcheck disable=SC2086  # DS_ARGS is a list of flags
exec deepspeed --hostfile "${HOSTFILE:-/job/hostfile}" ${DS_ARGS:-} train.py "$@"
