#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# System-prompt consolidation (reference: scripts/sys_consolidate.sh): the teacher answers with the
# medical or safety system prompt, the student without it learns to answer as the teacher does.
#
#   bash scripts/sys_consolidate.sh --model meta-llama/Llama-3.1-8B-Instruct \
#       --exp_name sys-medmcqa-l31-8b --system_prompt_type medmcqa \
#       --exp_path system_prompts/medmcqa.txt --actor_lr 5e-6 [more flags] [hydra overrides]
#
# Fixed as in the reference: temperature 1.0, 128 prompts per step, the paper trainer preset.
# `--help` lists the flags and defaults; scripts/common.sh documents the environment it reads.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_flag max_response_length 1024
opcd_flag system_prompt_type            # medmcqa | safety: picks the data, the metric and the task preset
opcd_parse_flags "$@"
opcd_require model exp_name system_prompt_type

case "$FLAG_system_prompt_type" in
    medmcqa | safety) OPCD_OVERRIDES+=("task=$FLAG_system_prompt_type") && opcd_task_data "$FLAG_system_prompt_type" ;;
    *) opcd_die "--system_prompt_type must be medmcqa or safety, got '$FLAG_system_prompt_type'" ;;
esac
opcd_common_overrides
OPCD_OVERRIDES+=(rollout.temperature=1.0 trainer.batch_size=128)
opcd_exec distill
