#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Off-policy training for math (reference: scripts/math_train_offp.sh): the student (no experience)
# learns from the teacher's shards with forward KL over the teacher's top-k (--kl_loss_type full,
# teacher log-probs recomputed) or seqkd (--kl_loss_type seqkd).
#
#   bash scripts/math_train_offp.sh --model Qwen/Qwen3-8B --exp_name math-q3-8b-lr5e-6-offp \
#       --kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 --exp_path "$BEST_EXP_PATH" \
#       --off_policy_save_dir runs/math-q3-8b-offp-data/off_policy_data
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_offpolicy_train_flags
opcd_flag max_response_length 16384
opcd_parse_flags "$@"
opcd_require model exp_name exp_path off_policy_save_dir

OPCD_OVERRIDES+=(task=math)
opcd_task_data math
opcd_offpolicy_overrides
opcd_common_overrides
# Passes by token budget, sized for 80 GB cards (docs/memory-plan.md): the update takes one longest row
# (a prompt with its 4,096-token experience, 5,120 tokens, + the response) or several shorter ones,
# its checkpointed activations, not the weights, set the memory (docs/gpus.md); the teacher's no-grad
# scoring keeps no activations for a backward and takes four such rows per pass.
budget=$((5120 + FLAG_max_response_length))
OPCD_OVERRIDES+=(rollout.temperature=0.6 trainer.batch_size=128 trainer.micro_batch_size=1
                 trainer.micro_batch_tokens="$budget" trainer.teacher_micro_batch_tokens=$((4 * budget)))
opcd_exec offpolicy train
