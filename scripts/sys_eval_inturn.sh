#!/usr/bin/env bash
# Evaluate every checkpoint of a system-prompt consolidation run without the system prompt, and the
# base model without and with it (reference: scripts/sys_eval_inturn.sh): 500 test items,
# temperature 1.0, top-p 0.8, top-k 20; prints the table and the mean of the 3 best checkpoints.
#
#   bash scripts/sys_eval_inturn.sh --exp_name sys-medmcqa-l31-8b [--use_bsl False]
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
opcd_eval_flags
opcd_flag use_bsl True
opcd_parse_flags "$@"
opcd_eval_overrides 1.0 0.8 20 500
opcd_exec evaluate
