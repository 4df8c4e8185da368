#!/usr/bin/env bash
# A throwaway Redis for tests and local multi-worker gateways: no persistence, loopback only.
#
#   scripts/redis.sh start DIR PORT   start it (files in DIR), wait for PING, print its URL
#   scripts/redis.sh stop DIR         stop the one started in DIR
#
# Both are idempotent and quiet on success. A Redis that Debian's package may have started on
# 6379 is never used: `start` always runs its own and checks that the one answering is it.
set -euo pipefail

die() { echo "redis.sh: $*" >&2; exit 1; }

# The pid of the redis-server started in DIR, if it still runs (a stale pidfile is ignored).
running_pid() {
    local pidfile="$1/redis.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid=$(<"$pidfile")
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == redis-server* ]] || return 1
    echo "$pid"
}

# Whether the server answering on PORT is the process PID (and not someone else's Redis).
answers_as() {
    local port="$1" pid="$2"
    redis-cli -h 127.0.0.1 -p "$port" info server 2>/dev/null | tr -d '\r' \
        | grep -qx "process_id:$pid"
}

install_redis() {
    [[ $(id -u) -eq 0 ]] || die "redis-server is not installed; install Debian's redis-server package (needs root)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
        >/dev/null 2>&1 || die "apt-get install redis-server failed"
}

start() {
    local dir="$1" port="$2" pid
    command -v redis-server >/dev/null || install_redis
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if ! pid=$(running_pid "$dir"); then
        : >"$dir/redis.log"
        redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" --appendonly no \
            >/dev/null || die "redis-server did not start (see $dir/redis.log)"
    fi
    for _ in $(seq 100); do
        if pid=$(running_pid "$dir") && answers_as "$port" "$pid"; then
            echo "redis://127.0.0.1:$port/0"
            return
        fi
        grep -q aborting "$dir/redis.log" 2>/dev/null && break
        sleep 0.1
    done
    die "redis-server on 127.0.0.1:$port did not answer: $(tail -n 1 "$dir/redis.log" 2>/dev/null)"
}

stop() {
    local dir="$1" pid
    pid=$(running_pid "$dir") || return 0
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "redis-server (pid $pid) did not stop"
}

case "${1:-}" in
    start) [[ $# -eq 3 ]] || die "usage: redis.sh start DIR PORT"; start "$2" "$3" ;;
    stop) [[ $# -eq 2 ]] || die "usage: redis.sh stop DIR"; stop "$2" ;;
    *) die "usage: redis.sh start DIR PORT | redis.sh stop DIR" ;;
esac
