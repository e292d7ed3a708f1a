#!/usr/bin/env bash
# Multi-node launch from a DeepSpeed-style hostfile ("hostname slots=N" per line), as GPT-NeoX users
# keep them. Starts torchrun on every host over ssh; node 0 is the first host.
#   HOSTFILE=/job/hostfile bash launch/deepspeed_hostfile.sh configs/125M_structmoe.yml
set -euo pipefail
hostfile=${HOSTFILE:-/job/hostfile}
[ -f "$hostfile" ] || { echo "hostfile: $hostfile does not exist (set HOSTFILE)" >&2; exit 2; }
mapfile -t hosts < <(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1}')
slots=$(grep -v '^\s*#' "$hostfile" | awk 'NF {sub("slots=", "", $2); print $2; exit}')
repo=$(cd "$(dirname "$0")/.." && pwd)
for i in "${!hosts[@]}"; do
  ssh "${hosts[$i]}" "cd $repo && NNODES=${#hosts[@]} NODE_RANK=$i NPROC=${slots:-8} MASTER_ADDR=${hosts[0]} \
    bash launch/torchrun.sh $*" &
done
wait
