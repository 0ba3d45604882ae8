#!/usr/bin/env bash
# Create .venv and install the project with the extras named in $1 (default: serve).
# torch/torchvision are installed first, pinned, so pip never swaps them for another build:
#   TORCH_SPEC      default "torch==2.14.1 torchvision==0.29.1"
#   TORCH_INDEX_URL optional: the index torch comes from, whatever the machine. Unset: on Linux with
#                   no NVIDIA GPU, PyTorch's CPU wheel index (small) when it answers, otherwise the
#                   default index (pip's configured one; on Linux that is the multi-GB CUDA build).
#   PYTHON          the interpreter .venv is created with (default python3)
# Progress goes to stderr; a run that finds everything installed is quiet and takes about a second.
# For testing the choice of index without installing anything:
#   SETUP_DRY_RUN=1          print the torch install command a fresh install would run, then exit
#                            (touches nothing, not even .venv)
#   CAPTIONER_CPU_INDEX_URL  the CPU wheel index (default https://download.pytorch.org/whl/cpu)
#   CAPTIONER_NVIDIA_GPU     1 or 0: take an NVIDIA GPU as present or absent instead of detecting it
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the clone this script is in, wherever it is called from
extras="${1:-serve}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
cpu_index="${CAPTIONER_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
cpu_index="${cpu_index%/}"
stamp=.venv/.captioner-setup # sha256 of pyproject.toml at the last complete install

say() { printf 'setup: %s\n' "$*" >&2; }

has_nvidia_gpu() {
    case "${CAPTIONER_NVIDIA_GPU:-}" in
        1) return 0 ;;
        0) return 1 ;;
    esac
    [ -e /proc/driver/nvidia ] && return 0
    command -v nvidia-smi >/dev/null 2>&1 || return 1
    if command -v timeout >/dev/null 2>&1; then
        timeout 15 nvidia-smi -L >/dev/null 2>&1
    else
        nvidia-smi -L >/dev/null 2>&1
    fi
}

# Does "$1" answer (an index page, within 10 s)?
reachable() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 10 -o /dev/null "$1" 2>/dev/null
    else
        "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$1" \
            >/dev/null 2>&1
    fi
}

# The index pip would use by default (pip.conf, PIP_INDEX_URL), so torch's own dependencies still
# resolve from it when torch comes from another index.
default_index() {
    local py="$python"
    [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -c 'from pip._internal.commands import create_command
print(create_command("install").parse_args([])[0].index_url)' 2>/dev/null \
        || echo "${PIP_INDEX_URL:-https://pypi.org/simple}"
}

# Sets torch_args (index options + TORCH_SPEC) and torch_from (words for the progress line).
choose_torch_index() {
    # shellcheck disable=SC2206
    local spec=($torch_spec)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_args=(--index-url "$TORCH_INDEX_URL" "${spec[@]}")
        torch_from="from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    elif [ "$(uname -s)" != Linux ]; then
        torch_args=("${spec[@]}")
        torch_from="from the default index"
    elif has_nvidia_gpu; then
        torch_args=("${spec[@]}")
        torch_from="NVIDIA GPU found: the CUDA build from the default index"
    elif reachable "$cpu_index/torch/"; then
        torch_args=(--index-url "$cpu_index" --extra-index-url "$(default_index)" "${spec[@]}")
        torch_from="CPU wheels from $cpu_index"
    else
        say "no NVIDIA GPU, but $cpu_index does not answer: falling back to the default index," \
            "which has the multi-GB CUDA build (set TORCH_INDEX_URL to choose)"
        torch_args=("${spec[@]}")
        torch_from="from the default index $(default_index)"
    fi
}

if [ "${SETUP_DRY_RUN:-0}" = 1 ]; then
    choose_torch_index
    say "would install $torch_spec ($torch_from)"
    echo "setup: dry run, would run: .venv/bin/python -m pip install -q ${torch_args[*]}"
    exit 0
fi

# Already set up? Quiet and quick: pyproject.toml unchanged since the last complete install, the
# project installed in editable mode from here, and every requirement of it and of these extras
# (transitively, torch included) present in a matching version. No import of torch here (seconds).
up_to_date() {
    [ -x .venv/bin/python ] && [ -f "$stamp" ] || return 1
    .venv/bin/python -I - "$extras" "$stamp" <<'PY' 2>/dev/null
import hashlib
import json
import os
import sys
from importlib import metadata
from urllib.parse import urlparse
from urllib.request import url2pathname

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

extras, stamp = sys.argv[1], sys.argv[2]
data = open("pyproject.toml", "rb").read()
if open(stamp).read().strip() != hashlib.sha256(data).hexdigest():
    sys.exit(1)
if tomllib:
    name = tomllib.loads(data.decode())["project"]["name"]
else:
    import re

    name = re.search(r'^name\s*=\s*"([^"]+)"', data.decode(), re.MULTILINE).group(1)
dists = {}
for d in metadata.distributions():
    if d.metadata["Name"]:
        dists.setdefault(canonicalize_name(d.metadata["Name"]), d)
project = dists.get(canonicalize_name(name))
if project is None:
    sys.exit(1)
direct = json.loads(project.read_text("direct_url.json") or "{}")
if not direct.get("dir_info", {}).get("editable"):
    sys.exit(1)
if os.path.realpath(url2pathname(urlparse(direct["url"]).path)) != os.path.realpath("."):
    sys.exit(1)
seen = set()


def satisfied(key, wanted):
    if (key, wanted) in seen:
        return True
    seen.add((key, wanted))
    dist = dists.get(key)
    if dist is None:
        return False
    provided = {canonicalize_name(e) for e in dist.metadata.get_all("Provides-Extra") or []}
    if not {canonicalize_name(e) for e in wanted} <= provided:
        return False
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", *wanted)):
            continue
        dep = dists.get(canonicalize_name(req.name))
        if dep is None or not req.specifier.contains(dep.version, prereleases=True):
            return False
        if not satisfied(canonicalize_name(req.name), frozenset(req.extras)):
            return False
    return True


wanted = frozenset(e.strip() for e in extras.split(",") if e.strip())
sys.exit(0 if satisfied(canonicalize_name(name), wanted) else 1)
PY
}

if up_to_date; then
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    choose_torch_index
    say "installing $torch_spec ($torch_from; this takes a few minutes the first time)"
    .venv/bin/python -m pip install -q "${torch_args[@]}"
fi
say "installing the project with extras [$extras]"
# the hash of the pyproject.toml being installed (taken first, in case it is edited meanwhile)
hash=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
# setuptools warns at every editable install that same-named folders in the working directory may shadow
# the package (a 9-line box): this clone's own folders are the package, so that warning alone is dropped
PYTHONWARNINGS="ignore:Editable installation:UserWarning" .venv/bin/python -m pip install -q -e ".[$extras]"
echo "$hash" >"$stamp"
say "done: .venv is ready"
