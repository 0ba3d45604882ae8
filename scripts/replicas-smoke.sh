#!/usr/bin/env bash
# Several captioner-serve replicas behind nginx on this host: first nginx's own limits (an oversized
# header, a malformed request or body, a burst over the rate, one connection too many: each a JSON error,
# 429 with Retry-After; requests within the limits pass), then real photos through the balancer with one
# replica SIGKILLed a third of the way through: nginx must resend the dead replica's requests (in flight
# included) to the others, so every request still gets its caption.
#
#   scripts/replicas-smoke.sh [--duration 30] [--concurrency 16] [--replicas 2] [--photos DIR]
#                             [--client-retries 0]
#
# - nginx: the one on PATH (or /usr/sbin/nginx; NGINX=... to choose); when it is missing and this runs
#   as root with apt-get, installs Debian's nginx package (APT_INSTALL=0 to refuse). The system nginx
#   and /etc/nginx are never used: nginx runs as the current user from a temp prefix, with the
#   config deploy/nginx/captioner.conf rewritten for this run's ports only.
# - replicas: .venv/bin/captioner-serve with the bundled default model (CAPTIONER_* variables are
#   passed through), each on a free loopback port; the script waits for each /ready. They log JSON lines
#   and trust nginx's X-Forwarded-For (CAPTIONER_TRUSTED_PROXIES=127.0.0.1, unless set), and the load
#   run checks that they logged its clients' addresses, not nginx's.
# - limits: scripts/replicas_load.py limits, with the numbers read from the config nginx runs.
# - load: scripts/replicas_load.py, --concurrency requests in flight for --duration seconds, photos
#   from --photos (default: Flickr8k's images, else COCO-mini's, when present), each worker from its own
#   loopback address (127.1.x.y) as separate clients would be; a request is ok only
#   when its last answer is 200 with a caption. A 503 (every replica shedding load) is retried after
#   its Retry-After up to --client-retries times, as captioner.client does (default 0: a 503 fails). It prints
#   a table (latency, statuses, each replica's share, nginx's retries and error-log lines) and last
#   `requests=N ok=N failed=N`.
# Exit status: 0 when every limit held and no request failed; 1 when not, or on a setup error (one line
# on stderr).
# Every process it started is stopped on exit, Ctrl-C included; the temp dir (logs) is kept on failure
# or with KEEP_TMP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=30
CONCURRENCY=16
REPLICAS=2
CLIENT_RETRIES=0
PHOTOS=""
for candidate in ../shared/data/flickr8k/images ../shared/data/coco-mini/train2017; do
    if [[ -d $candidate ]]; then PHOTOS=$candidate; break; fi
done

die() { printf 'replicas-smoke: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="${2:?--duration needs seconds}"; shift 2 ;;
        --concurrency) CONCURRENCY="${2:?--concurrency needs a number}"; shift 2 ;;
        --replicas) REPLICAS="${2:?--replicas needs a number}"; shift 2 ;;
        --photos) PHOTOS="${2:?--photos needs a folder}"; shift 2 ;;
        --client-retries) CLIENT_RETRIES="${2:?--client-retries needs a number}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ $DURATION =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--duration must be a number of seconds"
[[ $CONCURRENCY =~ ^[1-9][0-9]*$ ]] || die "--concurrency must be a positive integer"
[[ $REPLICAS =~ ^[0-9]+$ && $REPLICAS -ge 2 ]] || die "--replicas must be at least 2 (one is killed)"
[[ $CLIENT_RETRIES =~ ^[0-9]+$ ]] || die "--client-retries must be a number"
[[ -n $PHOTOS ]] || die "no photo folder (pass --photos DIR; default ../shared/data/flickr8k/images)"
[[ -d $PHOTOS ]] || die "no photo folder at $PHOTOS"

PY=.venv/bin/python
SERVE=.venv/bin/captioner-serve
[[ -x $PY && -x $SERVE ]] || die "no .venv with captioner-serve (run scripts/setup.sh serve)"

NGINX="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [[ ! -x $NGINX ]]; then
    if [[ "${APT_INSTALL:-1}" != 0 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing nginx with apt-get"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null || die "apt-get install nginx failed"
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    fi
    [[ -x $NGINX ]] || die "nginx is not installed and cannot be installed here (as root on Debian/Ubuntu: apt-get install -y nginx)"
fi
nginx_version=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')

tmp=$(mktemp -d /tmp/captioner-replicas.XXXXXX)
pids=()
nginx_pid=""
load_pid=""
rc=1
stop_all() {
    trap - EXIT INT TERM
    set +e
    [[ -n $load_pid ]] && kill -TERM "$load_pid" 2>/dev/null
    [[ -n $nginx_pid ]] && kill -TERM "$nginx_pid" 2>/dev/null
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    local all=("${pids[@]}" ${nginx_pid:+"$nginx_pid"} ${load_pid:+"$load_pid"})
    for _ in $(seq 50); do  # up to 10 s for a graceful stop, then SIGKILL
        local alive=0
        for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.2
    done
    [[ -n $nginx_pid ]] && pkill -KILL -P "$nginx_pid" 2>/dev/null  # its workers, if it had to be killed
    for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    if [[ $rc != 0 || "${KEEP_TMP:-0}" == 1 ]]; then
        echo "replicas-smoke: logs kept in $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap stop_all EXIT
trap 'rc=130; exit 130' INT
trap 'rc=143; exit 143' TERM

read -r -a ports <<<"$("$PY" scripts/replicas_load.py free-ports "$((REPLICAS + 1))")"
lb_port=${ports[0]}
replica_ports=("${ports[@]:1}")

echo "== $REPLICAS replicas on 127.0.0.1 ports ${replica_ports[*]} (logs in $tmp)"
for port in "${replica_ports[@]}"; do
    CAPTIONER_TRUSTED_PROXIES="${CAPTIONER_TRUSTED_PROXIES-127.0.0.1}" \
        "$SERVE" --host 127.0.0.1 --port "$port" --access-log json >"$tmp/replica-$port.log" 2>&1 &
    pids+=($!)
    disown  # no "Killed" line from bash for the replica the load run kills
done
ready_urls=()
pid_args=()
replica_logs=()
for i in "${!replica_ports[@]}"; do
    ready_urls+=("http://127.0.0.1:${replica_ports[$i]}/ready")
    pid_args+=(--pid "${pids[$i]}")
    replica_logs+=(--replica-log "$tmp/replica-${replica_ports[$i]}.log")
done
if ! "$PY" scripts/replicas_load.py wait-ready "${ready_urls[@]}" "${pid_args[@]}" --timeout 300; then
    for port in "${replica_ports[@]}"; do tail -n 5 "$tmp/replica-$port.log" >&2; done
    die "a replica did not become ready"
fi

echo "== $nginx_version on 127.0.0.1:$lb_port (prefix $tmp/nginx)"
mkdir -p "$tmp/nginx"
user_args=()
[[ $(id -u) -eq 0 ]] && user_args=(--user "$(id -un)" "$(id -gn)")  # root: workers as root, not nobody
replica_args=()
for port in "${replica_ports[@]}"; do replica_args+=(--replica "$port"); done
"$PY" scripts/replicas_load.py nginx-conf --template deploy/nginx/captioner.conf --listen "$lb_port" \
    "${replica_args[@]}" "${user_args[@]}" --out "$tmp/nginx/nginx.conf"
nginx_args=(-p "$tmp/nginx/" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf")
"$NGINX" "${nginx_args[@]}" -t -q || die "nginx rejected the config; see $tmp/nginx/error.log"
"$NGINX" "${nginx_args[@]}" -g 'daemon off;' &
nginx_pid=$!
"$PY" scripts/replicas_load.py wait-ready "http://127.0.0.1:$lb_port/ready" --pid "$nginx_pid" --timeout 30 \
    || die "nginx did not start; see $tmp/nginx/error.log"

echo "== limits"
"$PY" scripts/replicas_load.py limits --url "http://127.0.0.1:$lb_port" --conf "$tmp/nginx/nginx.conf" \
    || die "nginx's limits did not hold (above)"

echo "== load"
# in the background, so that a signal to this script is handled at once (bash runs traps only
# between commands, and `wait` is one it interrupts)
"$PY" scripts/replicas_load.py load --url "http://127.0.0.1:$lb_port" --photos "$PHOTOS" \
    --duration "$DURATION" --concurrency "$CONCURRENCY" --client-retries "$CLIENT_RETRIES" \
    --kill-pid "${pids[0]}" --kill-port "${replica_ports[0]}" --kill-at 0.333 \
    --access-log "$tmp/nginx/access.log" --error-log "$tmp/nginx/error.log" \
    "${replica_logs[@]}" &
load_pid=$!
load_rc=0
wait "$load_pid" || load_rc=$?
load_pid=""
rc=$load_rc
exit "$rc"
