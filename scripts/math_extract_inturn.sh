#!/usr/bin/env bash
# shellcheck disable=SC2154  # FLAG_<name> variables are set by opcd_parse_flags (printf -v)
# Experiential knowledge extraction for math (reference: scripts/math_extract_inturn.sh).
#
# Single run:  bash scripts/math_extract_inturn.sh --model Qwen/Qwen3-8B --exp_name math-extract \
#                  --ckpt 3 [--exp_sel_with_prev False] [--val_samples_limit 900] [--max_response_length 16384]
# No flags:    the reference's setting: Qwen/Qwen3-8B, 30 stream items, writer without the previous
#              experience, 16k tokens, seeds 0-9 (one run folder, every seed inside it).
#
# --ckpt is the seed (as in the reference); --prompt_version is accepted for compatibility and has
# one value here ("default": opcd has a single writer prompt, opcd/data/experience.py). The best
# experience over all seeds and steps is written to runs/<exp_name>/best_experience.txt:
#   export BEST_EXP_PATH=runs/<exp_name>/best_experience.txt
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

no_flags=$(($# == 0))
opcd_flag model
opcd_flag exp_name
opcd_flag nnodes 1
opcd_flag ckpt 0
opcd_flag prompt_version default
opcd_flag exp_sel_with_prev False
opcd_flag val_samples_limit 900
opcd_flag max_response_length 16384
opcd_flag stream_items 30
opcd_flag exp_model_path                # optional experience-writer model (same tokenizer)
opcd_parse_flags "$@"

seeds="[$FLAG_ckpt]"
if ((no_flags)); then
    FLAG_model=Qwen/Qwen3-8B
    FLAG_exp_name=math-extract-q3-8b
    seeds="[0,1,2,3,4,5,6,7,8,9]"
fi
opcd_require model exp_name
opcd_int ckpt
opcd_int nnodes
opcd_int val_samples_limit
opcd_int max_response_length
opcd_int stream_items
opcd_bool exp_sel_with_prev
[[ "$FLAG_prompt_version" == default ]] || \
    opcd_die "--prompt_version: opcd has one writer prompt ('default'), got '$FLAG_prompt_version'"

opcd_hydra_str model "$FLAG_model"
opcd_hydra_str exp_name "$FLAG_exp_name"
OPCD_OVERRIDES+=(task=math)
opcd_task_data math train,validation
OPCD_OVERRIDES+=(model=hf "model.path=$model" "trainer.exp_name=$exp_name"
    "extract.seeds=$seeds" "extract.stream_items=$FLAG_stream_items"
    "extract.heldout_size=$FLAG_val_samples_limit" "extract.writer_sees_previous=$FLAG_exp_sel_with_prev"
    "rollout.max_response_length=$FLAG_max_response_length" rollout.eval_temperature=0.6)
if [[ -n "$FLAG_exp_model_path" ]]; then
    opcd_hydra_str writer "$FLAG_exp_model_path"
    OPCD_OVERRIDES+=("extract.writer_path=$writer")
fi
if ((FLAG_nnodes > 1)); then
    OPCD_OVERRIDES+=(ray.address=auto "ray.nnodes=$FLAG_nnodes")
fi
opcd_hardware_overrides
opcd_exec extract
