#!/usr/bin/env bash
# Join this node to the Ray cluster of a multi-node run (reference: ray_node_setup.sh).
#
# Run it on EVERY node (after `bash setup.sh`), then launch the training script on rank 0 only,
# with the node count:
#
#   # every node, e.g. from the job scheduler, with NODE_RANK and MASTER_ADDR set:
#   bash ray_node_setup.sh
#   # then on rank 0:
#   bash scripts/sys_consolidate.sh --nnodes 2 ...      (-> ray.address=auto ray.nnodes=2)
#
# Rank 0 starts the head at MASTER_ADDR and returns; the other ranks wait until the head's port
# answers, join it and block (`ray start --block`), so the node stays in the cluster for as long as
# this script runs. Run `ray stop` on a node to leave or to restart.
#
# Environment: NODE_RANK (or RANK; default 0), MASTER_ADDR (default 127.0.0.1), RAY_PORT (6379),
# RAY_NUM_GPUS (default: counted with nvidia-smi -L, 0 without a GPU), RAY_WAIT_S (how long a worker
# waits for the head, default 600), OPCD_VENV (the venv with ray; default .venv, else ray on PATH).
# NCCL_*, GLOO_SOCKET_IFNAME, HF_HOME, ... set here reach this node's workers (list below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
RANK_="${NODE_RANK:-${RANK:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_WAIT_S="${RAY_WAIT_S:-600}"

VENV="${OPCD_VENV:-.venv}"
if [[ -x "$VENV/bin/ray" ]]; then
    RAY="$VENV/bin/ray"
elif command -v ray >/dev/null 2>&1; then
    RAY=ray
else
    echo "ray_node_setup.sh: error: ray not found (no $VENV/bin/ray and none on PATH); run: bash setup.sh" >&2
    exit 127
fi

if [[ -n "${RAY_NUM_GPUS:-}" ]]; then
    NUM_GPUS="$RAY_NUM_GPUS"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="$(nvidia-smi -L | grep -c '^GPU [0-9]' || true)"
else
    NUM_GPUS=0
fi

# The variables this node's Ray processes (and so its workers) get from here: the allow-list of
# opcd/runtime/envforward.py (the driver also forwards its own values in every actor's runtime_env,
# which win). Exported even when only set in this shell; names are printed, never values.
FORWARD_PREFIXES="NCCL_ GLOO_ TP_SOCKET_IFNAME HF_ HUGGING_FACE_HUB_TOKEN TRANSFORMERS_ WANDB_ CUDA_ TORCH_ PYTORCH_ VLLM_ OPCD_"
forwarded=()
for name in $(compgen -v); do
    for prefix in $FORWARD_PREFIXES; do
        if [[ "$name" == "$prefix"* && "$name" != CUDA_VISIBLE_DEVICES ]]; then
            export "${name?}"
            forwarded+=("$name")
            break
        fi
    done
done
echo "[ray_node_setup] environment for this node's workers: ${forwarded[*]:-none}"

if [[ "$RANK_" == 0 ]]; then
    echo "[ray_node_setup] rank 0: starting the Ray head at $MASTER_ADDR:$RAY_PORT with $NUM_GPUS GPUs"
    exec "$RAY" start --head --port="$RAY_PORT" --node-ip-address="$MASTER_ADDR" --num-gpus="$NUM_GPUS"
fi

echo "[ray_node_setup] rank $RANK_: waiting for the head at $MASTER_ADDR:$RAY_PORT (up to $RAY_WAIT_S s)"
deadline=$((SECONDS + RAY_WAIT_S))
until (exec 3<>"/dev/tcp/$MASTER_ADDR/$RAY_PORT") 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        echo "ray_node_setup.sh: error: no Ray head answered at $MASTER_ADDR:$RAY_PORT after $RAY_WAIT_S s" >&2
        exit 1
    fi
    sleep 5
done
echo "[ray_node_setup] rank $RANK_: joining with $NUM_GPUS GPUs; blocking to stay in the cluster"
exec "$RAY" start --address="$MASTER_ADDR:$RAY_PORT" --num-gpus="$NUM_GPUS" --block
