#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Off-policy data for math (reference: scripts/math_generate_offp.sh): the teacher solves the training
# problems WITH the experience and writes per step its responses and top-k log-probs (safetensors
# shards + manifest in runs/<exp_name>/off_policy_data; an interrupted run resumes).
#
#   bash scripts/math_generate_offp.sh --model Qwen/Qwen3-8B --exp_name math-q3-8b-offp-data \
#       --kl_topk 256 --max_response_length 16384 --exp_path "$BEST_EXP_PATH"
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_flag off_policy_save_dir          # shard folder (default: /tmp/<exp_name>/off_policy_data, as the reference)
opcd_flag max_response_length 16384
opcd_parse_flags "$@"
opcd_require model exp_name exp_path

OPCD_OVERRIDES+=(task=math)
opcd_task_data math
opcd_common_overrides
opcd_offpolicy_dir
OPCD_OVERRIDES+=(rollout.temperature=0.6 trainer.batch_size=128)
opcd_exec offpolicy generate
