#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: compile a small GPT and train it under 2BW.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fxpipe demo "$@"
