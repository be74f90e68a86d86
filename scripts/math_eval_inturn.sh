#!/usr/bin/env bash
# Evaluate every checkpoint of a math consolidation run without the experience (reference:
# scripts/math_eval_inturn.sh): 1,000 test problems, temperature 0.6, top-p 0.95, top-k 20, one
# sample each; prints the per-checkpoint table and the mean of the 3 best checkpoints.
#
#   bash scripts/math_eval_inturn.sh --exp_name math-q3-8b-lr5e-6 [--use_bsl True] [--ckpt 10]
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
opcd_eval_flags
opcd_parse_flags "$@"
opcd_eval_overrides 0.6 0.95 20 1000
opcd_exec evaluate
