#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Evaluate the checkpoints of a math consolidation run without the experience (reference:
# scripts/math_eval_inturn.sh): 1,000 test problems (data/dapo_test.parquet when prepared), temperature
# 0.6, top-p 0.95, top-k 20, one sample each; prints the per-checkpoint table and the mean of the 3 best.
#
#   bash scripts/math_eval_inturn.sh                                      # every published run found in runs/
#   bash scripts/math_eval_inturn.sh --exp_name math-q3-8b-lr5e-6 [--use_bsl True] [--ckpt 10]
#   bash scripts/math_eval_inturn.sh --model Qwen/Qwen3-8B [--eval_prepend_experience True --exp_path "$BEST_EXP_PATH"]
#                                                                          # the base model alone
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
no_flags=$(($# == 0))
opcd_eval_flags
opcd_parse_flags "$@"
if ((no_flags)); then
    opcd_eval_published "Qwen/Qwen3-8B math-q3-8b-lr5e-6" "Qwen/Qwen3-4B math-q3-8b-dist-4b-lr5e-6" \
        "Qwen/Qwen3-8B math-q3-8b-lr5e-6-offp"
fi
opcd_eval_overrides 0.6 0.95 20 1000 math
opcd_exec evaluate "${OPCD_EVAL_ARGS[@]}"
