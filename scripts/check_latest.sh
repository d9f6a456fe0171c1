#!/usr/bin/env bash
# Install the newest releases that pyproject.toml allows (not the lock) into a throwaway venv and run the tests that
# compare the swarm with local transformers token for token. Raise an upper bound in pyproject.toml only after this
# passes with the bound raised:
#
#     bash scripts/check_latest.sh                       # the newest versions pyproject.toml allows
#     bash scripts/check_latest.sh --lift transformers   # ... with transformers' upper bound removed
#
# Prints the installed versions and pytest's summary; exits non-zero when a test fails. Extra arguments after `--`
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
lift=()
while [ $# -gt 0 ]; do
    case "$1" in
        --lift) lift+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--lift PACKAGE]... [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
PY="$work/venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
pip_install() { "${PIP[@]}" install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip_install "$TORCH_SPEC"
# The project's requirements as pyproject.toml states them, minus the upper bound of each lifted package.
"$PY" - "${lift[@]}" > "$work/requirements.txt" <<'PY'
import re
import sys
import tomllib

lifted = {name.lower() for name in sys.argv[1:]}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    if name.lower() in lifted:
        requirement = ",".join(p for p in requirement.split(",") if not p.strip().startswith(("<", "~=", "==")))
    print(requirement)
PY
echo "[check_latest] requirements: $(tr '\n' ' ' < "$work/requirements.txt")"
pip_install --upgrade -r "$work/requirements.txt"
pip_install --no-deps -e .
echo "[check_latest] installed: $("$PY" -m pip --disable-pip-version-check freeze \
    | grep -i -E '^(torch|transformers|hivemind|bitsandbytes|peft|opacus|safetensors|multiaddr)==' | tr '\n' ' ')"
# Every test that compares the swarm's logits or tokens with local transformers running the same model.
"$PY" -m pytest -q -p no:cacheprovider --timeout 600 \
    tests/test_swarm.py tests/test_failover.py tests/test_push.py tests/test_finetune.py tests/test_drift.py \
    tests/test_checkpoint.py "$@"
