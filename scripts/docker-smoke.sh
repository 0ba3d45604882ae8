#!/usr/bin/env bash
# Build the Docker image under the README's tag (captioner), run it, caption a real photo through
# it, and remove the container; the image stays, so `docker run --rm -p 8000:8000 captioner` serves.
# Then the same for the slim image (captioner:slim, no torch): its size, the same caption, and its
# server's memory after 2,000 captions.
#
#   scripts/docker-smoke.sh [PHOTO]
#
# Works with or without Docker Hub and PyPI's usual hosts:
#   - scripts/docker-daemon.sh: as root with apt-get, installs docker.io when docker or dockerd is
#     missing (unless APT_INSTALL=0; otherwise says which package to install), and starts dockerd when
#     no daemon answers;
#   - installs debootstrap the same way when it is needed (below);
#   - uses BASE_IMAGE when it can be pulled (default python:3.11-slim-bookworm), otherwise builds a
#     local Debian bookworm + python3 base with debootstrap, with this host's CA bundle copied in (for
#     networks that reach the registries through a TLS-inspecting proxy), and imports it;
#   - takes torch from TORCH_INDEX_URL (default: PyTorch's CPU wheel index); when that is unreachable
#     and this host's pip is configured with local file:// indexes (an offline mirror), serves those
#     on loopback for the build.
# Environment: IMAGE (default captioner, i.e. captioner:latest, as in the README), SLIM_IMAGE (default
# IMAGE:slim), SLIM_LIMIT_MB (800), SLIM_RSS_LIMIT_MB (500), SLIM_REQUESTS (2000), BASE_IMAGE,
# TORCH_INDEX_URL, PIP_INDEX_URL, PORT (default 8000 on the host), KEEP_IMAGE=0 to remove the built
# image at the end (kept by default), APT_INSTALL=0 to never install packages, BUILD_LOG (default
# /tmp/captioner-docker-build.log).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-captioner}"
SLIM_IMAGE="${SLIM_IMAGE:-$IMAGE:slim}"
SLIM_LIMIT_MB="${SLIM_LIMIT_MB:-800}"  # the slim image's size limit, and its server's resident memory after
SLIM_RSS_LIMIT_MB="${SLIM_RSS_LIMIT_MB:-500}"  # SLIM_REQUESTS captions
SLIM_REQUESTS="${SLIM_REQUESTS:-2000}"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim-bookworm}"
LOCAL_BASE="captioner-base:bookworm"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
PIP_INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}"
PORT="${PORT:-8000}"
# a Flickr8k test photo (two dogs in snow) unless one is given; EXPECT: a word the caption must contain
PHOTO="${1:-../shared/data/flickr8k/images/3385593926_d3e9c21170.jpg}"
if [[ $# -eq 0 ]]; then EXPECT="${EXPECT:-dog}"; else EXPECT="${EXPECT:-}"; fi
CONTAINER="captioner-smoke-$$"
BUILD_LOG="${BUILD_LOG:-/tmp/captioner-docker-build.log}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c" || true; done' EXIT

say() { printf '\n== %s\n' "$*"; }
die() { printf 'docker-smoke: %s\n' "$*" >&2; exit 1; }
# Install Debian packages, when run as root where apt-get exists (and APT_INSTALL is not 0).
apt_updated=0
apt_install() {
    [[ "${APT_INSTALL:-1}" != 0 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
    echo "installing $* with apt-get"
    if [[ $apt_updated == 0 ]]; then
        apt-get update -qq || return 1
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

[[ -f "$PHOTO" ]] || die "no photo at $PHOTO (pass one: scripts/docker-smoke.sh PHOTO.jpg)"

say "Docker daemon"
scripts/docker-daemon.sh || exit 1

say "Base image"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    base="$BASE_IMAGE"
    echo "using $base"
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    base="$LOCAL_BASE"
    echo "$BASE_IMAGE cannot be pulled; using the local $base built earlier"
else
    command -v debootstrap >/dev/null || apt_install debootstrap \
        || die "$BASE_IMAGE cannot be pulled and debootstrap is not installed (Debian/Ubuntu: apt-get install -y debootstrap)"
    echo "$BASE_IMAGE cannot be pulled; building $LOCAL_BASE with debootstrap (a few minutes)"
    rootfs=$(mktemp -d /tmp/captioner-rootfs.XXXXXX)
    cleanup+=("rm -rf '$rootfs'")
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >/tmp/debootstrap.log 2>&1 \
        || die "debootstrap failed; see /tmp/debootstrap.log"
    [[ -f "$HOST_CA" ]] && cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$LOCAL_BASE" >/dev/null
    base="$LOCAL_BASE"
    echo "built $base ($(docker image inspect -f '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

say "Package indexes"
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
# the local base carries this host's CA bundle (a pulled base keeps its own)
[[ "$base" == "$LOCAL_BASE" ]] && build_args+=(--build-arg "PIP_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
if curl -fsS -m 20 -o /dev/null "$TORCH_INDEX_URL/torch/"; then
    echo "torch from $TORCH_INDEX_URL"
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
else
    # An offline mirror this host's pip already uses (pip config: extra-index-url = file:///...).
    mapfile -t local_indexes < <(pip config list 2>/dev/null | grep -oE 'file://[^ '"'"']+' | sed 's|^file://||' | sort -u)
    [[ ${#local_indexes[@]} -gt 0 ]] \
        || die "$TORCH_INDEX_URL is unreachable and pip has no local file:// index; set TORCH_INDEX_URL"
    mirror_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server "$mirror_port" --bind 127.0.0.1 --directory / >/tmp/captioner-mirror.log 2>&1 &
    cleanup+=("kill $!")
    urls=("${local_indexes[@]/#/http://127.0.0.1:$mirror_port}")
    echo "$TORCH_INDEX_URL is unreachable; serving this host's pip mirrors on loopback (then $PIP_INDEX_URL"
    echo "for what they lack): ${urls[*]}"
    echo "(these hold PyPI's CUDA build of torch, so this image is several GB; the default CPU index keeps it small)"
    build_args+=(--build-arg "TORCH_INDEX_URL=${urls[0]}" --build-arg "TORCH_EXTRA_INDEX_URL=${urls[*]:1} $PIP_INDEX_URL")
fi

say "docker build -t $IMAGE (progress below; the whole log: $BUILD_LOG)"
started=$SECONDS
# the image the tag names now: replaced by this build, it would stay behind untagged (6 GB a build)
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# every line as it comes (the first build installs PyTorch: minutes), indented, and kept in the log
docker build --network host "${build_args[@]}" -t "$IMAGE" . 2>&1 | tee "$BUILD_LOG" | sed -u 's/^/    /'
[[ ${PIPESTATUS[0]} -eq 0 ]] || die "docker build failed (log: $BUILD_LOG)"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
echo "built in $((SECONDS - started)) s; image size $size"
if [[ -n "$previous" && "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]]; then
    # only when nothing else names or uses it (docker rmi refuses then)
    if [[ -z "$(docker image inspect -f '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]] \
        && docker rmi "$previous" >/dev/null 2>&1; then
        echo "removed the image $IMAGE named before this build (${previous:7:12})"
    fi
fi
if [[ "${KEEP_IMAGE:-1}" == 0 ]]; then cleanup+=("docker rmi -f '$IMAGE' >/dev/null"); fi

say "docker run (no arguments: the embedded default model)"
docker run -d --name "$CONTAINER" -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
cleanup+=("docker rm -f '$CONTAINER' >/dev/null")
url="http://127.0.0.1:$PORT"
for _ in $(seq 120); do
    curl -fsS -m 2 "$url/health" >/dev/null 2>&1 && break
    [[ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" == true ]] || { docker logs "$CONTAINER"; die "the container exited"; }
    sleep 1
done
curl -fsS "$url/health" || { docker logs "$CONTAINER"; die "/health did not answer in 120 s"; }
echo
for _ in $(seq 60); do curl -fsS -m 2 "$url/ready" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS "$url/ready"; echo
echo "user in the container: $(docker exec "$CONTAINER" id -un)"
backend=$(curl -fsS "$url/model" | python3 -c 'import json, sys; print(json.load(sys.stdin)["backend"])')
echo "backend: $backend"
[[ "$backend" == onnxruntime ]] || die "the image should serve the default model on onnxruntime, not $backend"
if docker logs "$CONTAINER" 2>&1 | grep -q "exporting .* to ONNX"; then
    die "the container exported the model at start; the image should carry the export made at build time"
fi
echo "the ONNX export made at build time was used (no export at start)"

say "POST $PHOTO to /caption"
response=$(curl -sS -w '\n%{http_code}' -F "image=@$PHOTO" "$url/caption?method=beam&beam_size=3")
code=${response##*$'\n'}
body=${response%$'\n'*}
echo "HTTP $code"
echo "$body" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("caption:", r["captions"][0]["text"]); print("model:", r["model_id"], " timing:", r["timing"])'
[[ "$code" == 200 ]] || die "/caption answered $code"
caption=$(echo "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["captions"][0]["text"])')
[[ $(wc -w <<<"$caption") -ge 3 ]] || die "the caption is too short to be real: '$caption'"
if [[ -n "$EXPECT" ]]; then
    grep -qw "${EXPECT}s\?" <<<"$caption" || die "the caption should mention '$EXPECT': '$caption'"
    echo "the caption mentions '$EXPECT'"
fi

again=$(curl -fsS -F "image=@$PHOTO" "$url/caption?method=beam&beam_size=3")
echo "$again" | python3 -c 'import json, sys; r = json.load(sys.stdin); print("again:", r["captions"][0]["text"], " timing:", r["timing"])'

say "bad input gets a JSON error, not a 500"
bad=$(curl -sS -w ' HTTP %{http_code}' -F "image=@README.md" "$url/caption")
echo "$bad"
[[ "$bad" == *'HTTP 415' ]] || die "README.md as an image should give 415"

say "health check as Docker sees it"
for _ in $(seq 90); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")
    [[ "$status" != starting ]] && break
    sleep 1
done
echo "container health: $status"
[[ "$status" == healthy ]] || die "Docker's HEALTHCHECK reports $status"

say "API docs served from the image itself (no CDN)"
docs=$(curl -fsS "$url/docs")
[[ "$docs" != *'https://'* ]] || die "/docs references another host"
curl -fsS -o /dev/null "$url/docs/assets/swagger-ui-bundle.js" || die "/docs assets are missing from the image"
echo "/docs and its assets: ok"

say "docker stop drains and exits 0 (SIGTERM)"
docker stop -t 30 "$CONTAINER" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
echo "exit code after docker stop: $code"
[[ "$code" == 0 ]] || { docker logs "$CONTAINER" | tail -20; die "the container exited $code on SIGTERM"; }

say "docker build --target slim -t $SLIM_IMAGE (the runtime without torch)"
started=$SECONDS
previous=$(docker image inspect -f '{{.Id}}' "$SLIM_IMAGE" 2>/dev/null || true)
docker build --network host "${build_args[@]}" --target slim -t "$SLIM_IMAGE" . 2>&1 | tee -a "$BUILD_LOG" | sed -u 's/^/    /'
[[ ${PIPESTATUS[0]} -eq 0 ]] || die "docker build --target slim failed (log: $BUILD_LOG)"
slim_bytes=$(docker image inspect -f '{{.Size}}' "$SLIM_IMAGE")
slim_size=$(awk -v b="$slim_bytes" 'BEGIN {printf "%.0f MB", b/1e6}')
echo "built in $((SECONDS - started)) s; image size $slim_size (limit $SLIM_LIMIT_MB MB)"
(( slim_bytes <= SLIM_LIMIT_MB * 1000000 )) || die "the slim image is $slim_size, over $SLIM_LIMIT_MB MB"
if [[ -n "$previous" && "$previous" != "$(docker image inspect -f '{{.Id}}' "$SLIM_IMAGE")" ]]; then
    if [[ -z "$(docker image inspect -f '{{join .RepoTags ""}}' "$previous" 2>/dev/null)" ]] \
        && docker rmi "$previous" >/dev/null 2>&1; then
        echo "removed the image $SLIM_IMAGE named before this build (${previous:7:12})"
    fi
fi
if [[ "${KEEP_IMAGE:-1}" == 0 ]]; then cleanup+=("docker rmi -f '$SLIM_IMAGE' >/dev/null"); fi
# the export stage's image, untagged: it would keep the full image's layers alive after the next build replaces it
docker image prune -f --filter "label=captioner.stage=export" >/dev/null
if docker run --rm --entrypoint python3 "$SLIM_IMAGE" -c "import torch" >/dev/null 2>&1; then
    die "torch imports in the slim image"
fi
echo "no torch in the slim image (import torch fails)"

say "docker run $SLIM_IMAGE"
slim_port=$((PORT + 1))
docker run -d --name "$CONTAINER-slim" -p "127.0.0.1:$slim_port:8000" "$SLIM_IMAGE" >/dev/null
cleanup+=("docker rm -f '$CONTAINER-slim' >/dev/null")
slim_url="http://127.0.0.1:$slim_port"
for _ in $(seq 120); do
    curl -fsS -m 2 "$slim_url/ready" >/dev/null 2>&1 && break
    [[ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER-slim")" == true ]] \
        || { docker logs "$CONTAINER-slim"; die "the slim container exited"; }
    sleep 1
done
curl -fsS "$slim_url/ready" >/dev/null || { docker logs "$CONTAINER-slim"; die "the slim image was not ready in 120 s"; }
slim_caption=$(curl -fsS -F "image=@$PHOTO" "$slim_url/caption?method=beam&beam_size=3" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["captions"][0]["text"])')
echo "caption: $slim_caption"
[[ "$slim_caption" == "$caption" ]] || die "the slim image captions '$slim_caption', the full one '$caption'"
echo "the same caption as the full image"

say "$SLIM_REQUESTS requests to the slim image, then its memory"
codes=$(seq "$SLIM_REQUESTS" | xargs -P 2 -I{} curl -sS -o /dev/null -w '%{http_code}\n' -F "image=@$PHOTO" \
    "$slim_url/caption" | sort | uniq -c | tr -s ' ' | paste -sd, -)
echo "HTTP statuses (count status): $codes"
answered=$(awk -F, -v n="$SLIM_REQUESTS" '{for (i = 1; i <= NF; i++) {split($i, p, " "); if (p[2] == 200) ok = p[1]}} END {print ok + 0}' <<<"$codes")
(( answered * 10 >= SLIM_REQUESTS * 9 )) || die "only $answered of $SLIM_REQUESTS requests answered 200"
rss_kb=$(docker exec "$CONTAINER-slim" sh -c 'cat /proc/[0-9]*/status 2>/dev/null' | awk '/^VmRSS:/ {s += $2} END {print s}')
echo "resident memory of the container's processes: $((rss_kb / 1024)) MB (limit $SLIM_RSS_LIMIT_MB MB)"
(( rss_kb <= SLIM_RSS_LIMIT_MB * 1024 )) || die "the slim server holds $((rss_kb / 1024)) MB after $SLIM_REQUESTS requests"
docker stop -t 30 "$CONTAINER-slim" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER-slim")
[[ "$code" == 0 ]] || { docker logs "$CONTAINER-slim" | tail -20; die "the slim container exited $code on SIGTERM"; }

say "docker-smoke: passed"
echo "image: $IMAGE, $size"
echo "slim image: $SLIM_IMAGE, $slim_size, $((rss_kb / 1024)) MB resident after $SLIM_REQUESTS requests"
echo "caption of $PHOTO: $caption"
echo "serve it with: docker run --rm -p 8000:8000 $IMAGE (or $SLIM_IMAGE)"
