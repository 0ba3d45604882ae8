#!/usr/bin/env bash
# Make sure a Docker daemon answers: install docker.io when docker or dockerd is missing (as root on
# Debian/Ubuntu, unless APT_INSTALL=0) and start dockerd when no daemon answers (as root).
# Exit 0 when `docker info` answers; otherwise a one-line reason on stderr and exit 1.
# Used by docker-smoke.sh and by tests/test_dockerfile.py (which skips its image build on exit 1).
set -euo pipefail

die() { printf 'docker-daemon: %s\n' "$*" >&2; exit 1; }
apt_install() {
    [[ "${APT_INSTALL:-1}" != 0 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || return 1
    echo "installing $* with apt-get"
    apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v docker >/dev/null || apt_install docker.io \
    || die "docker is not installed (Debian/Ubuntu: apt-get install -y docker.io)"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || apt_install docker.io \
        || die "no Docker daemon answers and dockerd is not installed (Debian/Ubuntu: apt-get install -y docker.io)"
    [[ $(id -u) -eq 0 ]] || die "no Docker daemon answers; start it (sudo dockerd) or run this as root"
    echo "starting dockerd (log: /tmp/dockerd.log)"
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "dockerd did not start; see /tmp/dockerd.log"
fi
docker version --format 'Docker server {{.Server.Version}}, client {{.Client.Version}}'
