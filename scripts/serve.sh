#!/usr/bin/env bash
# Install (first run only) and serve the bundled default model on http://127.0.0.1:8000.
# Arguments go to captioner-serve, e.g. another port: scripts/serve.sh --port 9000
# The client extra is installed too: the Python client (captioner.client) is what the README uses next.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the clone this script is in, wherever it is called from
scripts/setup.sh serve,client
exec .venv/bin/captioner-serve "$@"
