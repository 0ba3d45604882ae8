#!/usr/bin/env bash
# Install (first run only) and serve the bundled default model on http://127.0.0.1:8000 (args go to captioner-serve).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
exec .venv/bin/captioner-serve "$@"
