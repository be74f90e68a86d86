#!/usr/bin/env bash
# The same as run_docker.sh for B200 (Blackwell): the image from docker/Dockerfile.b200, whose
# flash-attn build targets sm_100. Not run here: the development machine has no Docker engine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OPCD_IMAGE="${OPCD_IMAGE:-opcd:cu130-b200}" OPCD_DOCKERFILE=docker/Dockerfile.b200 exec bash run_docker.sh "$@"
