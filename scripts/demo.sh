#!/usr/bin/env bash
# The main job: set up from nothing, start a local 2-peer swarm, stream generated text, stop the peers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
