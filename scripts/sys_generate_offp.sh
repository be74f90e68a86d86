#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Off-policy data for system-prompt distillation (reference: scripts/sys_generate_offp.sh): the
# teacher answers the training prompts WITH the system prompt; shards in runs/<exp_name>/off_policy_data.
#
#   bash scripts/sys_generate_offp.sh --model meta-llama/Llama-3.1-8B-Instruct --exp_name med-offp-data \
#       --system_prompt_type medmcqa --exp_path system_prompts/medmcqa.txt --kl_topk 256
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_flag off_policy_save_dir          # shard folder (default: /tmp/<exp_name>/off_policy_data, as the reference)
opcd_flag system_prompt_type            # medmcqa | safety
opcd_parse_flags "$@"
opcd_require model exp_name system_prompt_type

case "$FLAG_system_prompt_type" in
    medmcqa | safety) OPCD_OVERRIDES+=("task=$FLAG_system_prompt_type") && opcd_task_data "$FLAG_system_prompt_type" ;;
    *) opcd_die "--system_prompt_type must be medmcqa or safety, got '$FLAG_system_prompt_type'" ;;
esac
opcd_common_overrides
opcd_offpolicy_dir
OPCD_OVERRIDES+=(rollout.temperature=1.0 trainer.batch_size=128)
opcd_exec offpolicy generate
