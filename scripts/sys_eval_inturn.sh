#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Evaluate the checkpoints of a system-prompt consolidation run without the system prompt, and the
# base model without and with it (reference: scripts/sys_eval_inturn.sh): 500 test items (data/sys_*_test
# when prepared), temperature 1.0, top-p 0.8, top-k 20; prints the table and the mean of the 3 best.
#
#   bash scripts/sys_eval_inturn.sh                                       # every published run found in runs/
#   bash scripts/sys_eval_inturn.sh --exp_name sys-medmcqa-l31-8b [--use_bsl False]
#   bash scripts/sys_eval_inturn.sh --model meta-llama/Llama-3.1-8B-Instruct --system_prompt_type medmcqa \
#       [--eval_prepend_experience True]                                  # the base model alone (with the prompt)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
no_flags=$(($# == 0))
opcd_eval_flags
opcd_flag use_bsl True
opcd_flag system_prompt_type medmcqa      # the task of a base model alone (a run's config has its own)
opcd_parse_flags "$@"
if ((no_flags)); then
    opcd_eval_published "meta-llama/Llama-3.1-8B-Instruct sys-medmcqa-l31-8b" \
        "meta-llama/Llama-3.2-3B-Instruct sys-medmcqa-l32-3b" "Qwen/Qwen2.5-7B-Instruct sys-medmcqa-q25-7b" \
        "meta-llama/Llama-3.1-8B-Instruct sys-safety-l31-8b" "meta-llama/Llama-3.2-3B-Instruct sys-safety-l32-3b" \
        "Qwen/Qwen2.5-7B-Instruct sys-safety-q25-7b" "Qwen/Qwen2.5-3B-Instruct sys-safety-q25-7b-dist-3b" \
        "Qwen/Qwen2.5-7B-Instruct sys-medmcqa-q25-7b-offp"
fi
case "$FLAG_system_prompt_type" in
    medmcqa | safety) ;;
    *) opcd_die "--system_prompt_type must be medmcqa or safety, got '$FLAG_system_prompt_type'" ;;
esac
opcd_eval_overrides 1.0 0.8 20 500 "$FLAG_system_prompt_type"
opcd_exec evaluate "${OPCD_EVAL_ARGS[@]}"
