#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Off-policy data for text games (reference: scripts/textgame_generate_offp.sh): the teacher plays the
# training episodes WITH the experience; every turn (prompt without and with experience, the
# teacher's answer, its top-k log-probs) goes into the step's shard.
#
#   bash scripts/textgame_generate_offp.sh --model Qwen/Qwen3-4B-Instruct-2507 \
#       --exp_name sokoban-q3-4b-ins-offp-data --kl_topk 256 --max_response_length 1024 \
#       --experience_max_length 8192 --textgame_name Sokoban-v0 --textgame_max_steps 5 \
#       --textgame_no_think True --exp_path "$BEST_EXP_PATH_SOKOBAN"
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

opcd_common_flags
opcd_textgame_flags
opcd_flag off_policy_save_dir          # shard folder (default: /tmp/<exp_name>/off_policy_data, as the reference)
opcd_flag textgame_episodes 64          # episodes per step
opcd_parse_flags "$@"
opcd_require model exp_name exp_path
opcd_int textgame_episodes

OPCD_OVERRIDES+=(task=textgame)
opcd_common_overrides
opcd_textgame_overrides
opcd_offpolicy_dir
OPCD_OVERRIDES+=(rollout.temperature=0.7 "game.episodes_per_step=$FLAG_textgame_episodes")
opcd_exec offpolicy generate
