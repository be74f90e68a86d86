#!/usr/bin/env bash
# Build the GPU image (A100/H100/H200: docker/Dockerfile) and open a shell in it with this checkout
# mounted at /workspace/opcd. Not run here: the development machine has no Docker engine.
#
#   bash run_docker.sh                 # build (cached after the first time) + interactive shell
#   bash run_docker.sh bash scripts/sys_consolidate.sh --model ...   # or run one command
#
# Inside the container: `bash setup.sh` (fast: reuses the image's venv), `bash ray_node_setup.sh`
# on every node of a multi-node job, then the launch scripts on rank 0.
# Environment: OPCD_IMAGE (image tag), OPCD_DOCKERFILE; WANDB_*, HF_TOKEN, NODE_RANK, MASTER_ADDR
# and OPCD_CACHE are passed into the container when set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

IMAGE="${OPCD_IMAGE:-opcd:cu130}"
DOCKERFILE="${OPCD_DOCKERFILE:-docker/Dockerfile}"

echo "[run_docker] building $IMAGE from $DOCKERFILE (runs setup.sh --gpu inside the image)"
docker build -f "$DOCKERFILE" -t "$IMAGE" .

ENV_ARGS=()
for name in WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY HF_TOKEN NODE_RANK RANK MASTER_ADDR RAY_PORT OPCD_CACHE; do
    if [[ -n "${!name:-}" ]]; then ENV_ARGS+=(-e "$name"); fi  # by name: values never on the command line
done
TTY_ARGS=()
if [[ -t 0 && -t 1 ]]; then TTY_ARGS=(-it); fi

echo "[run_docker] starting $IMAGE with $PWD at /workspace/opcd"
exec docker run --rm ${TTY_ARGS[@]+"${TTY_ARGS[@]}"} --gpus all --shm-size 64g --network host \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    -v "$PWD:/workspace/opcd" -w /workspace/opcd \
    ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} \
    "$IMAGE" "${@:-bash}"
