#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Math consolidation with experiential knowledge (reference: scripts/math_consolidate.sh): the
# teacher solves with the experience file in its prompt, the student without it learns to match.
#
#   bash scripts/math_consolidate.sh --model Qwen/Qwen3-8B --exp_name math-q3-8b-lr5e-6 --nnodes 2 \
#       --kl_topk 256 --actor_lr 5e-6 --max_response_length 16384 --exp_path "$BEST_EXP_PATH" \
#       task.train_data=data/dapo_train.parquet task.test_data=data/dapo_test.parquet
#
# Fixed as in the reference: temperature 0.6, 128 prompts per step, 50 steps by default. The math
# data default is offline reasoning-gym problems; point task.train_data at the DAPO parquet files.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_flag max_response_length 16384
opcd_parse_flags "$@"
opcd_require model exp_name exp_path

OPCD_OVERRIDES+=(task=math)
opcd_task_data math
opcd_common_overrides
# Passes by token budget, sized for 80 GB cards (docs/memory-plan.md): the update takes one longest row
# (a prompt with its 4,096-token experience, 5,120 tokens, + the response) or several shorter ones,
# its checkpointed activations, not the weights, set the memory (docs/gpus.md); the teacher's no-grad
# scoring keeps no activations for a backward and takes four such rows per pass.
budget=$((5120 + FLAG_max_response_length))
OPCD_OVERRIDES+=(rollout.temperature=0.6 trainer.batch_size=128 trainer.micro_batch_size=1
                 trainer.micro_batch_tokens="$budget" trainer.teacher_micro_batch_tokens=$((4 * budget)))
opcd_exec distill
