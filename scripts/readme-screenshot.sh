#!/usr/bin/env bash
# Regenerate docs/images/web-page.png, the README's screenshot, with the browser test that checks it
# (tests/e2e/test_readme_screenshot.py: the bundled model, a real server, headless Chromium).
# Needs Debian's chromium and the shared data's coco-mini photo; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the clone this script is in, wherever it is called from
scripts/setup.sh dev
CAPTIONER_SCREENSHOT="$PWD/docs/images/web-page.png" \
    exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_readme_screenshot.py "$@"
