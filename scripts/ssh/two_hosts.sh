#!/usr/bin/env bash
# A multi-node opcd run on plain hosts over ssh (no scheduler), the same shape as
# scripts/slurm/opcd.sbatch: every host joins the Ray cluster (ray_node_setup.sh; the head on the
# first host), the launcher runs on the first host with --nnodes = the host count, and at exit
# `ray stop` runs on every host.
#
#   OPCD_HOSTS="10.0.0.1 10.0.0.2" bash scripts/ssh/two_hosts.sh scripts/sys_consolidate.sh \
#       --model Qwen/Qwen2.5-7B-Instruct --exp_name sys-medmcqa-q25-7b --system_prompt_type medmcqa \
#       --exp_path system_prompts/medmcqa.txt
#
# Run it from any machine that reaches the hosts with key-based ssh (BatchMode: no password prompts).
# The checkout must be at the same path on every host (shared storage, or the same clone and set-up:
# `bash setup.sh` on each), by default this checkout's path (OPCD_REMOTE_REPO to change it).
#
# Environment: OPCD_HOSTS (two or more hosts, first = head; required), OPCD_HEAD_IP (default: the first
# host, resolved with getent when it is a name), OPCD_REMOTE_REPO, OPCD_SSH (default: ssh -o BatchMode=yes),
# RAY_PORT (6379), OPCD_VENV (default <checkout>/.venv on each host), OPCD_NODE_WAIT_S (600), OPCD_DRY_RUN=1 (print the commands instead of
# running them). See docs/clusters-ops.md.
set -euo pipefail

CL_NAME=two_hosts.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/cluster_lib.sh
source "$REPO/scripts/cluster_lib.sh"

read -r -a HOSTS <<<"${OPCD_HOSTS:-}"
((${#HOSTS[@]} >= 2)) || cl_die "OPCD_HOSTS must name two or more hosts (the first is the head), got '${OPCD_HOSTS:-}'"
NNODES=${#HOSTS[@]}
HEAD="${HOSTS[0]}"
MASTER_ADDR="$(cl_head_ip "$HEAD")"
RAY_PORT="${RAY_PORT:-6379}"
REMOTE_REPO="${OPCD_REMOTE_REPO:-$REPO}"
read -r -a SSH <<<"${OPCD_SSH:-ssh -o BatchMode=yes}"
cl_launcher_args "$REPO" "$NNODES" "$@"
VENV="$(cl_venv "$REMOTE_REPO")"  # the venv setup.sh made on each host (ray, python, opcd)
cl_say "$NNODES hosts (${HOSTS[*]}), head $HEAD at $MASTER_ADDR:$RAY_PORT, checkout $REMOTE_REPO"

remote() {  # remote HOST WORDS...: run WORDS in the checkout on HOST (each word quoted for the remote shell)
    local host="$1" line
    shift
    line="cd $(printf '%q' "$REMOTE_REPO") && $(printf '%q ' "$@")"
    cl_run "${SSH[@]}" "$host" "$line"
}

NODE_PIDS=()
cleanup() {
    local rc=$? host
    trap - EXIT INT TERM
    cl_say "stopping Ray on every host"
    for host in "${HOSTS[@]}"; do
        remote "$host" "$VENV/bin/ray" stop --force || true
    done
    if ((${#NODE_PIDS[@]})); then kill "${NODE_PIDS[@]}" 2>/dev/null || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

# The head first (ray_node_setup.sh returns once it is up), then each worker in the background: they
# block (`ray start --block`) for as long as their ssh session lives.
for rank in "${!HOSTS[@]}"; do
    words=(env "NODE_RANK=$rank" "MASTER_ADDR=$MASTER_ADDR" "RAY_PORT=$RAY_PORT" "OPCD_VENV=$VENV" bash ray_node_setup.sh)
    if ((rank == 0)) || [[ "${OPCD_DRY_RUN:-0}" == 1 ]]; then
        remote "${HOSTS[$rank]}" "${words[@]}"
    else
        remote "${HOSTS[$rank]}" "${words[@]}" &
        NODE_PIDS+=($!)
    fi
done

remote "$HEAD" "$VENV/bin/python" tools/ray_wait_nodes.py --nodes "$NNODES" --timeout-s "${OPCD_NODE_WAIT_S:-600}"
remote "$HEAD" env "OPCD_VENV=$VENV" bash "${CL_LAUNCHER[@]}"
