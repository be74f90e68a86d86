#!/usr/bin/env bash
# The reference's name for the B200 install: setup.sh's GPU path, flash-attn compiled for sm_100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS:-100}" exec bash setup.sh --gpu "$@"
