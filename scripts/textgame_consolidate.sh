#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Text-game consolidation with experiential knowledge (reference: scripts/textgame_consolidate.sh):
# the student plays episodes without experience; the teacher scores every turn with the experience
# block in its prompt.
#
#   bash scripts/textgame_consolidate.sh --model Qwen/Qwen3-4B-Instruct-2507 \
#       --exp_name sokoban-q3-4b-ins-lr5e-6 --nnodes 1 --kl_loss_type full --kl_topk 256 \
#       --actor_lr 5e-6 --max_response_length 1024 --experience_max_length 8192 \
#       --textgame_name Sokoban-v0 --textgame_max_steps 5 --textgame_no_think True \
#       --exp_path "$BEST_EXP_PATH_SOKOBAN"
#
# Fixed as in the reference: temperature 0.7, 64 episodes per step, prompt budget = experience
# budget + 512 tokens per move. --textgame_mode trajectory (an opcd extension) trains on whole
# episodes with a loss mask over the model's answers instead of one sample per turn.
# OEL (reference follow-up): --deploy_save_dir DIR trains on the states stored by
# textgame_generate_deploy.sh (DIR/states.jsonl) as round --oel_round of `opcd oel` (run folder
# runs/<exp_name>/round_<r>/consolidate, teacher = the round's starting policy); --exp_path may be a
# .list of experience files (one sampled per state); --resume_policy_name/--resume_policy_ckpt start
# from an earlier checkpoint.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_textgame_flags
opcd_flag textgame_episodes 64          # episodes per training step
opcd_oel_flags
opcd_parse_flags "$@"
opcd_require exp_name exp_path
opcd_int textgame_episodes
opcd_int oel_round
opcd_resume_policy

OPCD_OVERRIDES+=(task=textgame)
opcd_common_overrides
opcd_textgame_overrides
OPCD_OVERRIDES+=(rollout.temperature=0.7 "game.episodes_per_step=$FLAG_textgame_episodes")
if [[ -n "$FLAG_deploy_save_dir" ]]; then
    # an OEL round: `opcd oel`'s consolidate phase, in runs/<exp_name>/round_<oel_round>/consolidate
    opcd_deploy_overrides
    OPCD_OVERRIDES+=("oel.phases=[consolidate]" "oel.rounds=$FLAG_oel_round" "oel.first_round=$FLAG_oel_round")
    opcd_exec oel
fi
opcd_exec distill
