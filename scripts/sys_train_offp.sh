#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Off-policy training for system-prompt distillation (reference: scripts/sys_train_offp.sh): the
# student (no system prompt) learns from the teacher's shards (forward KL over its top-k, or seqkd).
#
#   bash scripts/sys_train_offp.sh --model meta-llama/Llama-3.1-8B-Instruct --exp_name med-offp \
#       --system_prompt_type medmcqa --exp_path system_prompts/medmcqa.txt --actor_lr 5e-6 \
#       --off_policy_save_dir runs/med-offp-data/off_policy_data
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_offpolicy_train_flags
opcd_flag system_prompt_type            # medmcqa | safety
opcd_parse_flags "$@"
opcd_require model exp_name system_prompt_type off_policy_save_dir

case "$FLAG_system_prompt_type" in
    medmcqa | safety) OPCD_OVERRIDES+=("task=$FLAG_system_prompt_type") && opcd_task_data "$FLAG_system_prompt_type" ;;
    *) opcd_die "--system_prompt_type must be medmcqa or safety, got '$FLAG_system_prompt_type'" ;;
esac
opcd_offpolicy_overrides
opcd_common_overrides
OPCD_OVERRIDES+=(rollout.temperature=1.0 trainer.batch_size=128)
opcd_exec offpolicy train
