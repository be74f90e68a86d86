# shellcheck shell=bash
# Shared pieces of the cluster start scripts (scripts/slurm/opcd.sbatch, scripts/ssh/two_hosts.sh);
# source it, it runs nothing by itself.
#
# The shape both follow: every node joins the Ray cluster with ray_node_setup.sh (rank 0 = the head at
# MASTER_ADDR), the driver waits until all nodes are in (tools/ray_wait_nodes.py), runs the launcher
# on the first node with --nnodes N, and on exit, however it ends, `ray stop` runs on every node.
#
# Environment read here:
#   OPCD_DRY_RUN=1   print each command (shell-quoted, one per line) instead of running it, as the
#                    launchers do; nothing is started, no address is looked up on the network
#   OPCD_HEAD_IP     the head's address (default: the first node's name resolved with getent)
#   OPCD_VENV        the venv with ray and opcd (default <repo>/.venv; else ray/python on PATH)
#   OPCD_NODE_WAIT_S how long the driver waits for every node to join (default 600)

cl_die() {  # one line on stderr, exit 2
    echo "${CL_NAME:-cluster}: error: $*" >&2
    exit 2
}

cl_say() { echo "[${CL_NAME:-cluster}] $*" >&2; }

cl_run() {  # cl_run CMD...: run it, or print it (OPCD_DRY_RUN=1)
    if [[ "${OPCD_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

cl_venv() {  # cl_venv REPO: the venv setup.sh made, as an absolute path (OPCD_VENV, default REPO/.venv)
    local venv="${OPCD_VENV:-$1/.venv}"
    [[ "$venv" == /* ]] || venv="$1/$venv"
    echo "$venv"
}

cl_bin() {  # cl_bin REPO NAME: the venv's NAME (absolute), else NAME from PATH
    local venv
    venv="$(cl_venv "$1")"
    if [[ -x "$venv/bin/$2" ]]; then
        echo "$venv/bin/$2"
    else
        echo "$2"
    fi
}

cl_head_ip() {  # cl_head_ip HOST: OPCD_HEAD_IP, else HOST's IPv4 address (never a loopback one)
    local host="$1" ip
    if [[ -n "${OPCD_HEAD_IP:-}" ]]; then
        echo "$OPCD_HEAD_IP"
        return 0
    fi
    if [[ "$host" =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
        ip="$host"
    else
        ip="$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 {print $1}')" || true
    fi
    [[ -n "$ip" ]] || cl_die "cannot resolve the head node '$host' to an address; set OPCD_HEAD_IP"
    # Debian-style /etc/hosts maps the own name to 127.0.1.1: other nodes could not reach that
    [[ "$ip" != 127.* ]] || cl_die "the head node '$host' resolves to $ip (loopback); set OPCD_HEAD_IP to its cluster address"
    echo "$ip"
}

cl_launcher_args() {  # cl_launcher_args REPO NNODES ARGS...: CL_LAUNCHER = the launcher line with --nnodes NNODES
    local repo="$1" nnodes="$2"
    shift 2
    (($# >= 1)) || cl_die "no launcher given (e.g. scripts/sys_consolidate.sh --model ... --exp_name ...)"
    [[ "$1" == /* && -f "$1" || -f "$repo/$1" ]] || \
        cl_die "the first argument must be a launcher script of the checkout (e.g. scripts/sys_consolidate.sh), got '$1'"
    local arg
    for arg in "$@"; do
        [[ "$arg" == --nnodes || "$arg" == --nnodes=* ]] && cl_die "--nnodes is set from the node count ($nnodes); leave it out"
    done
    # shellcheck disable=SC2034  # read by the scripts that source this file
    CL_LAUNCHER=("$1" --nnodes "$nnodes" "${@:2}")
}
