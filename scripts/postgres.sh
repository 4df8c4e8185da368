#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and local gateways.
#
#   scripts/postgres.sh start DIR PORT   initialise DIR if needed, serve on 127.0.0.1:PORT (and a
#                                        unix socket in DIR), create database `distillscope`, print
#                                        postgresql://postgres@127.0.0.1:PORT/distillscope
#   scripts/postgres.sh stop DIR         stop the cluster in DIR (a no-op when it is not running)
#   scripts/postgres.sh install          install Debian's postgresql when no server is installed
#
# Why: the traffic log's PostgreSQL backend is tested against a real server, and such tests fail
# (never skip) when none can be started. Trust authentication, loopback only: never expose this.
# Idempotent and quiet on success; as root, the server runs as the `postgres` OS user (PostgreSQL
# refuses to run as root), so DIR must be reachable by that user (e.g. under /tmp, not ~root).
set -euo pipefail

DATABASE=distillscope

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

# The bin directory of the newest installed PostgreSQL server, or nothing.
find_bindir() {
    local dir
    dir="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$dir" && -x "$dir/postgres" && -x "$dir/initdb" ]]; then
        echo "$dir"
        return
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$dir/postgres" && -x "$dir/initdb" ]]; then
            echo "$dir"
            return
        fi
    done
    return 0
}

install_server() {
    [[ -n "$(find_bindir)" ]] && return
    [[ "$(id -u)" -eq 0 ]] ||
        die "no PostgreSQL server is installed and installing it needs root; run: sudo apt-get install -y postgresql"
    echo "postgres.sh: installing postgresql with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    [[ -n "$(find_bindir)" ]] || die "apt-get finished but no PostgreSQL server binaries were found"
}

# Run a server binary as the user that owns the cluster: `postgres` when we are root.
as_owner() {
    if [[ "$(id -u)" -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local dir="$1" port="$2" bindir data log
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
    install_server
    bindir="$(find_bindir)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    data="$dir/data"
    log="$dir/postgres.log"
    if [[ "$(id -u)" -eq 0 ]]; then
        chown postgres: "$dir"
        as_owner test -w "$dir" ||
            die "$dir is not reachable by the postgres user; use a directory under /tmp"
    fi
    if [[ ! -f "$data/PG_VERSION" ]]; then
        as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-locale \
            >"$dir/initdb.log" 2>&1 || die "initdb failed; see $dir/initdb.log"
    fi
    if ! as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_owner "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null ||
            die "the server did not start; see $log"
    fi
    local running_port
    running_port="$(sed -n 4p "$data/postmaster.pid")"
    [[ "$running_port" == "$port" ]] ||
        die "the cluster in $dir is already running on port $running_port, not $port"
    for _ in $(seq 100); do
        "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" && break
        sleep 0.1
    done
    "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" || die "the server does not accept connections; see $log"
    local psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
    if [[ -z "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" ]]; then
        "${psql[@]}" -c "CREATE DATABASE $DATABASE" >/dev/null
    fi
    echo "postgresql://postgres@127.0.0.1:$port/$DATABASE"
}

stop() {
    local dir="$1" bindir
    [[ -f "$dir/data/PG_VERSION" ]] || return 0
    bindir="$(find_bindir)"
    [[ -n "$bindir" ]] || die "no PostgreSQL server is installed"
    if as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
}

case "${1:-}" in
    start)
        [[ $# -eq 3 ]] || die "usage: $0 start DIR PORT"
        start "$2" "$3"
        ;;
    stop)
        [[ $# -eq 2 ]] || die "usage: $0 stop DIR"
        stop "$2"
        ;;
    install)
        [[ $# -eq 1 ]] || die "usage: $0 install"
        install_server
        ;;
    *)
        die "usage: $0 start DIR PORT | stop DIR | install"
        ;;
esac
