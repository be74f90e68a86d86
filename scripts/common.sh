# shellcheck shell=bash disable=SC2154  # FLAG_<name> variables are assigned with printf -v
# Shared pieces of the launch scripts (source it; it runs nothing by itself).
#
# A launcher keeps the reference's flags and defaults and turns them into `opcd` Hydra overrides:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#   opcd_common_flags                          # register the flags every launcher has
#   opcd_flag max_response_length 512          # a script's own default, or a script-only flag
#   opcd_parse_flags "$@"                      # FLAG_<name> variables + OPCD_PASSTHROUGH array
#   opcd_require model exp_name                # missing -> one line on stderr, exit 2
#   opcd_common_overrides                      # fills the OPCD_OVERRIDES array
#   OPCD_OVERRIDES+=(rollout.temperature=1.0)  # script-specific settings
#   opcd_exec distill                          # env, then exec opcd (or print it: OPCD_DRY_RUN=1)
#
# Flags take `--name value` or `--name=value`. The first argument that is not a known flag, and
# everything after it, is passed to opcd verbatim, after the launcher's own overrides (so a trailing
# `trainer.lr=1e-5` wins). Boolean flags accept True/False/true/false (and 1/0, yes/no).
#
# Environment read here:
#   OPCD_DRY_RUN=1    print the final command line (shell-quoted) instead of running it
#   OPCD_CFG_ONLY=1   run `opcd distill --cfg ...`: print the resolved config, load no model
#   OPCD_NUM_GPUS     GPUs on this node; default: counted with `nvidia-smi -L` (0 without a GPU)
#   OPCD_DATA_DIR     where tools/prepare_data.py wrote the paper's datasets (default: data)
#   OPCD_RUNS_DIR     run folders (default: runs); OPCD_OFFP_ROOT: off-policy shards (default: /tmp)
#   OPCD_VENV         the venv setup.sh made (default <repo>/.venv); else `opcd` from PATH
#   WANDB_API_KEY     when set, wandb is added to the loggers (the key stays in the environment only)

OPCD_SCRIPT_NAME="$(basename "${0:-launcher}")"
OPCD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPCD_KNOWN_FLAGS=()
OPCD_PASSTHROUGH=()
OPCD_OVERRIDES=()

opcd_die() {  # one line on stderr, exit 2 (a usage error)
    echo "$OPCD_SCRIPT_NAME: error: $*" >&2
    exit 2
}

opcd_flag() {  # opcd_flag NAME [DEFAULT]: register a flag (again: just set its default)
    local name="$1"
    local known
    for known in ${OPCD_KNOWN_FLAGS[@]+"${OPCD_KNOWN_FLAGS[@]}"}; do
        if [[ "$known" == "$name" ]]; then
            printf -v "FLAG_$name" '%s' "${2-}"
            return 0
        fi
    done
    OPCD_KNOWN_FLAGS+=("$name")
    printf -v "FLAG_$name" '%s' "${2-}"
}

opcd_common_flags() {  # the flags and defaults every reference launcher shares (launchers.md)
    opcd_flag model                        # required by the launchers that train
    opcd_flag ref_model_path               # teacher; empty = the student's initial weights
    opcd_flag exp_name                     # run name: run folder and wandb run
    opcd_flag exp_path                     # context file (experience text or system prompt)
    opcd_flag experience_max_length 4096
    opcd_flag nnodes 1
    opcd_flag rollout_n 1
    opcd_flag kl_loss_type full
    opcd_flag kl_topk 256
    opcd_flag kl_renorm_topk False
    opcd_flag kl_tail_bucket False         # opcd extension: the tail-bucket support (loss.support_mode=tail)
    opcd_flag kl_merge_indice False
    opcd_flag actor_lr 1e-6
    opcd_flag max_response_length 1024
    opcd_flag total_training_steps 50
    opcd_flag save_freq 2
}

opcd_usage() {
    echo "usage: bash scripts/$OPCD_SCRIPT_NAME [--flag value ...] [hydra.override=value ...]"
    echo "flags (default):"
    local name value
    for name in "${OPCD_KNOWN_FLAGS[@]}"; do
        value="FLAG_$name"
        printf '  --%-24s %s\n' "$name" "${!value:-(none)}"
    done
    echo "Anything from the first unknown argument on is passed to 'opcd distill' as Hydra overrides."
}

opcd_parse_flags() {  # opcd_parse_flags "$@"
    local arg name value known found
    while (($#)); do
        arg="$1"
        if [[ "$arg" == -h || "$arg" == --help ]]; then
            opcd_usage
            exit 0
        fi
        found=0
        if [[ "$arg" == --* ]]; then
            name="${arg#--}"
            name="${name%%=*}"
            for known in "${OPCD_KNOWN_FLAGS[@]}"; do
                [[ "$known" == "$name" ]] && found=1 && break
            done
        fi
        if ((!found)); then
            OPCD_PASSTHROUGH=("$@")  # the first unknown argument and everything after it
            return 0
        fi
        if [[ "$arg" == *=* ]]; then
            value="${arg#*=}"
            shift
        else
            (($# >= 2)) || opcd_die "--$name needs a value"
            value="$2"
            shift 2
        fi
        printf -v "FLAG_$name" '%s' "$value"
    done
}

opcd_require() {  # opcd_require NAME...: each flag must have a non-empty value
    local name value
    for name in "$@"; do
        value="FLAG_$name"
        [[ -n "${!value}" ]] || opcd_die "--$name is required (see --help)"
    done
}

opcd_bool() {  # opcd_bool NAME: normalise FLAG_<NAME> to true|false, or exit 2
    local var="FLAG_$1"
    case "${!var}" in
        True | true | TRUE | 1 | yes | Yes) printf -v "$var" true ;;
        False | false | FALSE | 0 | no | No) printf -v "$var" false ;;
        *) opcd_die "--$1 expects True or False, got '${!var}'" ;;
    esac
}

opcd_int() {  # opcd_int NAME: FLAG_<NAME> must be an integer (possibly negative), or exit 2
    local var="FLAG_$1"
    [[ "${!var}" =~ ^-?[0-9]+$ ]] || opcd_die "--$1 expects an integer, got '${!var}'"
}

opcd_hydra_str() {  # opcd_hydra_str VAR VALUE: VAR = VALUE as a Hydra string (bare when unambiguous, else quoted)
    local value="$2" out
    if [[ "$value" =~ ^[A-Za-z_./][A-Za-z0-9_./:-]*$ ]] \
        && ! [[ "${value,,}" =~ ^(true|false|null|nan|inf)$ ]]; then
        out="$value"
    elif [[ "$value" != *"'"* ]]; then
        out="'$value'"
    elif [[ "$value" != *'"'* ]]; then
        out="\"$value\""
    else
        opcd_die "a value cannot contain both quote characters: $value"
    fi
    printf -v "$1" '%s' "$out"
}

opcd_num_gpus() {  # print the GPUs on this node: `nvidia-smi -L` lines (0 when it fails)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU [0-9]' || true
    else
        echo 0
    fi
}

opcd_common_overrides() {  # the common flags -> OPCD_OVERRIDES (group selections first)
    opcd_bool kl_renorm_topk
    opcd_bool kl_tail_bucket
    opcd_bool kl_merge_indice
    opcd_int nnodes
    opcd_int rollout_n
    opcd_int kl_topk
    opcd_int experience_max_length
    opcd_int max_response_length
    opcd_int total_training_steps
    opcd_int save_freq
    ((FLAG_nnodes >= 1)) || opcd_die "--nnodes must be >= 1, got $FLAG_nnodes"

    local support="partial"  # the reference's default: the plain top-k partial sum
    if [[ "$FLAG_kl_renorm_topk" == true && "$FLAG_kl_tail_bucket" == true ]]; then
        opcd_die "--kl_renorm_topk and --kl_tail_bucket are alternatives; set at most one to True"
    elif [[ "$FLAG_kl_renorm_topk" == true ]]; then
        support="renorm"
    elif [[ "$FLAG_kl_tail_bucket" == true ]]; then
        support="tail"
    fi

    local model teacher context exp_name kl_loss_type
    opcd_hydra_str model "$FLAG_model"
    opcd_hydra_str exp_name "$FLAG_exp_name"
    opcd_hydra_str kl_loss_type "$FLAG_kl_loss_type"
    OPCD_OVERRIDES+=(model=hf "model.path=$model")
    if [[ -n "$FLAG_ref_model_path" && "$FLAG_ref_model_path" != "$FLAG_model" ]]; then
        opcd_hydra_str teacher "$FLAG_ref_model_path"
        OPCD_OVERRIDES+=("model.teacher_path=$teacher")
    fi
    if [[ -n "$FLAG_exp_path" ]]; then
        opcd_hydra_str context "$FLAG_exp_path"
        OPCD_OVERRIDES+=("task.context_path=$context")
    fi
    OPCD_OVERRIDES+=(
        "task.experience_max_length=$FLAG_experience_max_length"
        "rollout.n=$FLAG_rollout_n"
        "rollout.max_response_length=$FLAG_max_response_length"
        "loss.kl_loss_type=$kl_loss_type"
        "loss.kl_topk=$FLAG_kl_topk"
        "loss.support_mode=$support"
        "loss.kl_merge_indice=$FLAG_kl_merge_indice"
        trainer=paper
        "trainer.exp_name=$exp_name"
        "trainer.lr=$FLAG_actor_lr"
        "trainer.total_training_steps=$FLAG_total_training_steps"
        "trainer.save_freq=$FLAG_save_freq"
    )
    if [[ -n "${WANDB_API_KEY:-}" ]]; then
        OPCD_OVERRIDES+=("trainer.loggers=[console,jsonl,wandb]")
    else
        OPCD_OVERRIDES+=("trainer.loggers=[console,jsonl]")
    fi
    if ((FLAG_nnodes > 1)); then
        OPCD_OVERRIDES+=(ray.address=auto "ray.nnodes=$FLAG_nnodes")
    fi
    opcd_hardware_overrides
}

opcd_hardware_overrides() {  # GPUs of this node; vLLM on GPU; fp32 and default attention on CPU
    local gpus="${OPCD_NUM_GPUS:-}"
    if [[ -z "$gpus" ]]; then
        gpus="$(opcd_num_gpus)"
    fi
    [[ "$gpus" =~ ^[0-9]+$ ]] || opcd_die "OPCD_NUM_GPUS must be a whole number, got '$gpus'"
    # opcd's `auto` values do the rest (opcd/config/schema.py): ray.ranks_per_group = every GPU of the nnodes,
    # the teacher on the same ranks, bf16, activation checkpointing on GPU; `--cfg` prints them
    if ((gpus > 0)); then
        OPCD_OVERRIDES+=("ray.gpus_per_node=$gpus" rollout.backend=vllm)  # the reference always samples with vLLM
    else
        OPCD_OVERRIDES+=(model.dtype=float32 model.attn_implementation=null ray.gpus_per_node=0)
    fi
}

OPCD_RG_SIZE=256  # problems per split of an rg: source (opcd.tasks.loading.REASONING_GYM_DEFAULT_SIZE; a test keeps them equal)

opcd_passthrough_sets() {  # opcd_passthrough_sets KEY: true when the user's overrides set KEY
    local word
    for word in ${OPCD_PASSTHROUGH[@]+"${OPCD_PASSTHROUGH[@]}"}; do
        [[ "$word" == "$1="* || "$word" == "+$1="* ]] && return 0
    done
    return 1
}

opcd_task_data() {  # opcd_task_data math|medmcqa|safety [train,validation,test]: ./data when there, else one line
    local task="$1" wanted="${2:-train,validation,test}" dir="${OPCD_DATA_DIR:-data}" prefix fallback size
    case "$task" in
        math) prefix=dapo ;;
        medmcqa | safety) prefix="sys_$task" ;;
        *) opcd_die "no paper data for task '$task'" ;;
    esac
    local role files=() missing=()
    for role in train validation test; do
        [[ ",$wanted," == *",$role,"* ]] || continue
        [[ "$role" == validation && "$task" != math ]] && continue  # the system-prompt sets have no validation split
        files+=("$role")
        [[ -f "$dir/${prefix}_$role.parquet" ]] || missing+=("$dir/${prefix}_$role.parquet")
    done
    if ((${#missing[@]} == 0)); then
        for role in "${files[@]}"; do
            local path
            opcd_hydra_str path "$dir/${prefix}_$role.parquet"
            OPCD_OVERRIDES+=("task.${role}_data=$path")
        done
        return 0
    fi
    if ((${#missing[@]} < ${#files[@]})); then
        opcd_die "$dir has only some of the $task files (missing ${missing[*]}); run: python tools/prepare_data.py"
    fi
    if opcd_passthrough_sets task.train_data || opcd_passthrough_sets task.test_data; then
        return 0  # the user named the data
    fi
    if [[ "$task" == math ]]; then
        fallback="rg:gsm_symbolic, generated offline by reasoning-gym ($OPCD_RG_SIZE problems per split)"
    else
        size="$(grep -c . "$OPCD_REPO/opcd/data/bundled/${task}_train.jsonl") + $(grep -c . "$OPCD_REPO/opcd/data/bundled/${task}_test.jsonl")"
        fallback="the bundled samples bundled:${task}_train / bundled:${task}_test ($size rows)"
    fi
    echo "$OPCD_SCRIPT_NAME: no ${missing[0]} (python tools/prepare_data.py writes the paper's data): using $fallback" >&2
}

opcd_exec() {  # opcd_exec SUBCOMMAND [STAGE]: set the environment, then exec opcd (or print the command)
    export TOKENIZERS_PARALLELISM=true
    # The collective timeout is ray.collective_timeout_s (default 30 min); an NCCL_TIMEOUT exported by the
    # user still applies (seconds), none is set here (a 10 h default left failed runs hanging for hours).
    export HYDRA_FULL_ERROR=1
    # WANDB_API_KEY / WANDB_PROJECT are read by wandb from the environment; never printed here.

    local venv="${OPCD_VENV:-$OPCD_REPO/.venv}"
    [[ "$venv" == /* ]] || venv="$OPCD_REPO/$venv"
    local opcd_bin
    if [[ -x "$venv/bin/opcd" ]]; then
        opcd_bin="$venv/bin/opcd"
    elif command -v opcd >/dev/null 2>&1; then
        opcd_bin="opcd"
    else
        echo "$OPCD_SCRIPT_NAME: error: opcd not found (no $venv/bin/opcd and none on PATH); run: bash setup.sh" >&2
        exit 127
    fi

    local cmd=("$opcd_bin" "$1")
    if [[ "${OPCD_CFG_ONLY:-0}" == 1 ]]; then
        cmd+=(--cfg)  # before a stage word: `opcd offpolicy --cfg generate ...`
    fi
    cmd+=("${@:2}")
    cmd+=(${OPCD_OVERRIDES[@]+"${OPCD_OVERRIDES[@]}"} ${OPCD_PASSTHROUGH[@]+"${OPCD_PASSTHROUGH[@]}"})

    if [[ "${OPCD_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
        exit 0
    fi
    echo "[$OPCD_SCRIPT_NAME] $(printf '%q ' "${cmd[@]}")" >&2
    exec "${cmd[@]}"
}

opcd_eval_flags() {  # the flags of the *_eval_inturn.sh launchers
    opcd_flag model                        # base model: the baselines of a run; alone when there is no run folder
    opcd_flag exp_name                     # the run to evaluate: runs/<exp_name> (or $OPCD_RUNS_DIR/<exp_name>)
    opcd_flag exp_path                     # context file (default: the run's; needed for a base model alone)
    opcd_flag nnodes 1
    opcd_flag ckpt                         # one checkpoint step; empty = every checkpoint of the run
    opcd_flag use_bsl False                # also evaluate the base model without and with the context
    opcd_flag eval_prepend_experience False  # also evaluate WITH the context (checkpoints, or the base model alone)
    opcd_flag max_response_length
    opcd_flag val_samples_limit            # test items (default: the reference's per-task size)
}

opcd_eval_overrides() {  # opcd_eval_overrides TEMPERATURE TOP_P TOP_K LIMIT TASK -> OPCD_EVAL_ARGS + OPCD_OVERRIDES
    # With a run folder runs/<exp_name>: its checkpoints (`opcd evaluate RUN_DIR key=value ...`). Without
    # one, --model alone (`opcd evaluate --base ...`, composed like a training run of TASK).
    opcd_bool use_bsl
    opcd_bool eval_prepend_experience
    opcd_int nnodes
    [[ -n "$FLAG_exp_name" || -n "$FLAG_model" ]] || opcd_die "--exp_name (a run) or --model (a base model alone) is required"
    local run_dir="${OPCD_RUNS_DIR:-runs}/$FLAG_exp_name" quoted
    if [[ -n "$FLAG_exp_name" && -f "$run_dir/config.yaml" ]]; then
        OPCD_EVAL_ARGS=("$run_dir")
        OPCD_OVERRIDES+=("evaluate.baselines=$FLAG_use_bsl")
        if [[ -n "$FLAG_model" ]]; then
            opcd_hydra_str quoted "$FLAG_model"
            OPCD_OVERRIDES+=("model.path=$quoted")
        fi
    elif [[ -n "$FLAG_model" ]]; then
        OPCD_EVAL_ARGS=(--base)
        local name="${FLAG_exp_name:-base-$(basename "$FLAG_model")-$5}"
        opcd_hydra_str quoted "$FLAG_model"
        OPCD_OVERRIDES+=("task=$5" model=hf "model.path=$quoted" "trainer.exp_name=$name" "evaluate.baselines=$FLAG_use_bsl")
        [[ "$5" == textgame ]] || opcd_task_data "$5" test
        opcd_hardware_overrides
        if ((FLAG_nnodes > 1)); then
            OPCD_OVERRIDES+=(ray.address=auto "ray.nnodes=$FLAG_nnodes")
        fi
    else
        opcd_die "no run folder $run_dir (expected runs/<exp_name> written by a consolidate script; or give --model to evaluate a base model alone)"
    fi
    OPCD_OVERRIDES+=("rollout.eval_temperature=$1" "rollout.eval_top_p=$2" "rollout.eval_top_k=$3"
        "evaluate.limit=${FLAG_val_samples_limit:-$4}" "evaluate.with_context=$FLAG_eval_prepend_experience")
    if [[ -n "$FLAG_exp_path" ]]; then
        opcd_hydra_str quoted "$FLAG_exp_path"
        OPCD_OVERRIDES+=("task.context_path=$quoted")
    fi
    if [[ -n "$FLAG_ckpt" ]]; then
        opcd_int ckpt
        OPCD_OVERRIDES+=("evaluate.steps=[$FLAG_ckpt]")
    fi
    if [[ -n "$FLAG_max_response_length" ]]; then
        opcd_int max_response_length
        OPCD_OVERRIDES+=("rollout.max_response_length=$FLAG_max_response_length")
    fi
    if [[ "${OPCD_EVAL_ARGS[0]}" != --base ]] && ((FLAG_nnodes > 1)); then
        OPCD_OVERRIDES+=(ray.address=auto "ray.nnodes=$FLAG_nnodes")
    fi
}

opcd_eval_published() {  # opcd_eval_published "MODEL EXP_NAME" ...: the no-flag form, every run found
    local pair found=0
    for pair in "$@"; do
        local model="${pair%% *}" exp_name="${pair#* }"
        if [[ -f "${OPCD_RUNS_DIR:-runs}/$exp_name/config.yaml" ]]; then
            found=1
            bash "$0" --model "$model" --exp_name "$exp_name" || exit $?
        else
            echo "$OPCD_SCRIPT_NAME: skipped $exp_name (no ${OPCD_RUNS_DIR:-runs}/$exp_name)" >&2
        fi
    done
    ((found)) || opcd_die "none of the published runs is in ${OPCD_RUNS_DIR:-runs}/ (give --exp_name RUN or --model BASE)"
    exit 0
}

opcd_textgame_flags() {  # the text-game flags of the reference's textgame_* launchers
    opcd_flag experience_max_length 8192     # the reference's game experience budget
    opcd_flag textgame_name FrozenLake-v0-raw  # FrozenLake-v0-raw (= FrozenLake-v0), Sokoban-v0, textarena:<id>
    opcd_flag textgame_max_steps 5
    opcd_flag textgame_no_think True
    opcd_flag textgame_mode turn             # opcd extension: turn (reference) | trajectory
}

opcd_textgame_overrides() {  # text-game flags -> OPCD_OVERRIDES
    opcd_int textgame_max_steps
    opcd_bool textgame_no_think
    case "$FLAG_textgame_mode" in
        turn | trajectory) ;;
        *) opcd_die "--textgame_mode must be turn or trajectory, got '$FLAG_textgame_mode'" ;;
    esac
    local name thinking=true
    [[ "$FLAG_textgame_no_think" == true ]] && thinking=false
    opcd_hydra_str name "$FLAG_textgame_name"
    # the prompt budget (experience + 512 per move) follows from these in task/textgame.yaml
    OPCD_OVERRIDES+=("game.name=$name" "game.max_steps=$FLAG_textgame_max_steps" "game.mode=$FLAG_textgame_mode"
        "task.enable_thinking=$thinking")
}

opcd_offpolicy_train_flags() {  # the extra flags of the *_train_offp.sh launchers
    opcd_flag off_policy_save_dir          # the shard folder written by the matching *_generate_offp.sh
    opcd_flag teacher_logprobs recompute   # opcd extension: recompute (reference) | stored
}

opcd_offpolicy_dir() {  # the shard folder: --off_policy_save_dir, else where the reference's commands put it
    local dir="${FLAG_off_policy_save_dir:-${OPCD_OFFP_ROOT:-/tmp}/$FLAG_exp_name/off_policy_data}"
    opcd_hydra_str dir "$dir"
    OPCD_OVERRIDES+=("offpolicy.save_dir=$dir")
}

opcd_offpolicy_overrides() {  # --kl_loss_type full|seqkd -> offpolicy.objective; shard folder
    case "$FLAG_kl_loss_type" in
        full) OPCD_OVERRIDES+=(offpolicy.objective=forward_kl) ;;
        seqkd) OPCD_OVERRIDES+=(offpolicy.objective=seqkd) ;;
        *) opcd_die "--kl_loss_type for off-policy training must be full (forward KL) or seqkd, got '$FLAG_kl_loss_type'" ;;
    esac
    FLAG_kl_loss_type=full  # the on-policy loss field keeps its default; the objective above decides
    opcd_offpolicy_dir
    if [[ -n "${FLAG_teacher_logprobs:-}" ]]; then
        case "$FLAG_teacher_logprobs" in
            recompute | stored) OPCD_OVERRIDES+=("offpolicy.teacher_logprobs=$FLAG_teacher_logprobs") ;;
            *) opcd_die "--teacher_logprobs must be recompute or stored, got '$FLAG_teacher_logprobs'" ;;
        esac
    fi
}

opcd_oel_flags() {  # the OEL flags of the reference's follow-up launchers
    opcd_flag oel_round 1                 # the round: runs/<exp_name>/round_<r>/{deploy,consolidate}
    opcd_flag deploy_save_dir             # consolidate on the states stored there (states.jsonl)
    opcd_flag resume_policy_name          # start from runs/<name>/global_step_<ckpt>/model
    opcd_flag resume_policy_ckpt
}

opcd_resume_policy() {  # --resume_policy_name/--resume_policy_ckpt -> FLAG_model (a checkpoint's model folder)
    if [[ -n "${FLAG_resume_policy_name:-}" || -n "${FLAG_resume_policy_ckpt:-}" ]]; then
        [[ -n "${FLAG_resume_policy_name:-}" && -n "${FLAG_resume_policy_ckpt:-}" ]] || \
            opcd_die "--resume_policy_name and --resume_policy_ckpt go together"
        opcd_int resume_policy_ckpt
        FLAG_model="${OPCD_RUNS_DIR:-runs}/$FLAG_resume_policy_name/global_step_$FLAG_resume_policy_ckpt/model"
    fi
    [[ -n "$FLAG_model" ]] || opcd_die "--model (or --resume_policy_name with --resume_policy_ckpt) is required"
}

opcd_deploy_overrides() {  # --deploy_save_dir -> train on its states.jsonl
    if [[ -n "${FLAG_deploy_save_dir:-}" ]]; then
        local states
        opcd_hydra_str states "${FLAG_deploy_save_dir%/}/states.jsonl"
        OPCD_OVERRIDES+=("game.states_path=$states")
    fi
}
