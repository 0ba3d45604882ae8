#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine, then the tests. Extra args go to pytest.
# scripts/test.sh -m "not slow": the fast subset (README, "The two commands"); CI runs everything.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the clone this script is in, wherever it is called from
# System packages: Chromium for the browser tests, Java for METEOR, nginx for the replicas smoke test,
# WordNet for the tag table's rebuild check (each skipped cleanly when absent).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    [ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)  # scripts/make_imagenet_tags.py's source
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
