#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Evaluate the checkpoints of a text-game consolidation run without the experience (reference:
# scripts/textgame_eval_inturn.sh): pass rate over 128 fixed-seed held-out episodes, temperature 0.7,
# top-p 0.95, top-k 20; prints the per-checkpoint table and the mean of the 3 best checkpoints. The
# game, move limit and thinking switch come from the run's own config.yaml (or the game flags, for a
# base model alone).
#
#   bash scripts/textgame_eval_inturn.sh                                  # every published run found in runs/
#   bash scripts/textgame_eval_inturn.sh --exp_name sokoban-q3-4b-ins-lr5e-6 [--use_bsl True] [--ckpt 10]
#   bash scripts/textgame_eval_inturn.sh --model Qwen/Qwen3-4B-Instruct-2507 --textgame_name Sokoban-v0 \
#       --textgame_no_think True [--eval_prepend_experience True --exp_path "$BEST_EXP_PATH_SOKOBAN"]
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
no_flags=$(($# == 0))
opcd_eval_flags
opcd_textgame_flags
opcd_parse_flags "$@"
if ((no_flags)); then
    opcd_eval_published "Qwen/Qwen3-4B-Instruct-2507 sokoban-q3-4b-ins-lr5e-6" \
        "Qwen/Qwen3-1.7B frozenlake-q3-1b7-think-lr5e-6" "Qwen/Qwen3-4B-Instruct-2507 sokoban-q3-4b-ins-lr5e-6-offp" \
        "Qwen/Qwen3-1.7B frozenlake-q3-1b7-think-lr5e-6-offp"
fi
opcd_eval_overrides 0.7 0.95 20 128 textgame
if [[ "${OPCD_EVAL_ARGS[0]}" == --base ]]; then
    opcd_int experience_max_length
    OPCD_OVERRIDES+=("task.experience_max_length=$FLAG_experience_max_length")
    opcd_textgame_overrides
fi
OPCD_OVERRIDES+=("game.eval_episodes=${FLAG_val_samples_limit:-128}")
opcd_exec evaluate "${OPCD_EVAL_ARGS[@]}"
