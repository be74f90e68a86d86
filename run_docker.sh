#!/usr/bin/env bash
# Build the GPU image (A100/H100/H200: docker/Dockerfile) and open a shell in it with this checkout
# mounted at /workspace/opcd. Not run here: the development machine has no Docker engine.
#
#   bash run_docker.sh                 # build (cached after the first time) + interactive shell
#   bash run_docker.sh bash scripts/sys_consolidate.sh --model ...   # or run one command
#
# Inside the container: `bash setup.sh` (fast: reuses the image's venv), `bash ray_node_setup.sh`
# on every node of a multi-node job, then the launch scripts on rank 0.
#
# InfiniBand / RoCE: when the host has /dev/infiniband, the container gets those devices, IPC_LOCK
# and an unlimited locked-memory limit (RDMA pins its buffers), and the image carries rdma-core and
# the verbs providers, so NCCL can use NET/IB between nodes; on a host without it the same command
# runs without the device (NCCL then uses sockets). Check with NCCL_DEBUG=INFO: docs/clusters-ops.md.
#
# Environment: OPCD_IMAGE (image tag), OPCD_DOCKERFILE; OPCD_IB_DEVICES (default /dev/infiniband);
# OPCD_DRY_RUN=1 prints the docker commands instead of running them. Passed into the container by
# name when set (values never on the command line): WANDB_*, HF_TOKEN, HF_HOME, NODE_RANK, RANK,
# MASTER_ADDR, RAY_PORT, OPCD_CACHE, every NCCL_* and the GLOO_/TP_SOCKET_IFNAME interface choices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

IMAGE="${OPCD_IMAGE:-opcd:cu130}"
DOCKERFILE="${OPCD_DOCKERFILE:-docker/Dockerfile}"
IB_DEVICES="${OPCD_IB_DEVICES:-/dev/infiniband}"
DRY_RUN="${OPCD_DRY_RUN:-0}"

run() {  # run CMD...: run it, or print it shell-quoted (OPCD_DRY_RUN=1)
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

echo "[run_docker] building $IMAGE from $DOCKERFILE (runs setup.sh --gpu inside the image)" >&2
run docker build -f "$DOCKERFILE" -t "$IMAGE" .

ENV_ARGS=()
for name in WANDB_API_KEY WANDB_PROJECT WANDB_ENTITY HF_TOKEN HF_HOME NODE_RANK RANK MASTER_ADDR RAY_PORT \
    OPCD_CACHE GLOO_SOCKET_IFNAME TP_SOCKET_IFNAME $(compgen -e | grep '^NCCL_' || true); do
    if [[ -n "${!name:-}" ]]; then ENV_ARGS+=(-e "$name"); fi  # by name: values never on the command line
done
RDMA_ARGS=(--ulimit memlock=-1 --cap-add IPC_LOCK)  # harmless without RDMA; needed with it
if [[ -d "$IB_DEVICES" ]]; then
    RDMA_ARGS+=(--device "$IB_DEVICES")
    echo "[run_docker] $IB_DEVICES found: passing the RDMA devices to the container" >&2
else
    echo "[run_docker] no $IB_DEVICES on this host: NCCL will use sockets between nodes" >&2
fi
TTY_ARGS=()
if [[ -t 0 && -t 1 ]]; then TTY_ARGS=(-it); fi

echo "[run_docker] starting $IMAGE with $PWD at /workspace/opcd" >&2
CMD=(docker run --rm ${TTY_ARGS[@]+"${TTY_ARGS[@]}"} --gpus all --shm-size 64g --network host
    "${RDMA_ARGS[@]}" --ulimit stack=67108864
    -v "$PWD:/workspace/opcd" -w /workspace/opcd
    ${ENV_ARGS[@]+"${ENV_ARGS[@]}"}
    "$IMAGE" "${@:-bash}")
if [[ "$DRY_RUN" == 1 ]]; then
    run "${CMD[@]}"
    exit 0
fi
exec "${CMD[@]}"
