#!/usr/bin/env bash
# Create .venv and install the project with the extras named in $1 (default: serve).
# torch/torchvision are installed first, pinned, so pip never swaps them for another build:
#   TORCH_SPEC     default "torch==2.14.1 torchvision==0.29.1"
#   TORCH_INDEX_URL optional, e.g. https://download.pytorch.org/whl/cpu for a small CPU-only install
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
