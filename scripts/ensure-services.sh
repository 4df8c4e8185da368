#!/usr/bin/env bash
# Make sure the servers the tests start for themselves are installed: PostgreSQL and Redis from
# Debian. The tests run their own throwaway instances (scripts/postgres.sh, scripts/redis.sh) and
# fail, never skip, when one cannot start. Idempotent: a no-op when both are installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

"$here/postgres.sh" install

if ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "ensure-services: redis-server is missing; run: sudo apt-get install -y redis-server" >&2
        exit 1
    fi
    echo "ensure-services: installing redis-server with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
