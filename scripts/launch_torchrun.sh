#!/usr/bin/env bash
# FSDP2 training of JetMoE with torchrun (one command per node; Lightning reads torchrun's environment).
#
#   # single node, 8 GPUs
#   scripts/launch_torchrun.sh
#   # node i of N (run on every node; MASTER_ADDR = node 0's address, reachable from all nodes)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh
#   # extra arguments go to `jetmoe train`: overrides, or --resume to continue from checkpoints/last.ckpt
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh data.batch_size=4 --resume
#   # expert parallelism: the experts split over the 8 GPUs of each node, FSDP over the nodes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh model.num_local_experts=64 trainer.expert_parallel=8
#
# run.output_dir must be on a filesystem all nodes share (sharded checkpoints are one file per rank).
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
EXPERIMENT="${EXPERIMENT:-experiments/jetmoe_8b.yaml}"
PYTHON="${PYTHON:-python}"

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m jetmoe.cli train "$EXPERIMENT" \
    trainer.strategy=fsdp trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"
