"""A real Redis for the tests, started by scripts/redis.sh on a free port and stopped at the end."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SH = Path(__file__).resolve().parents[1] / "scripts" / "redis.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """The URL of a throwaway redis-server; tests that use it fail if it cannot start."""
    directory = tmp_path_factory.mktemp("redis")
    try:
        for _ in range(3):  # a free port can be taken (another worker's server) before it binds
            started = subprocess.run(
                [REDIS_SH, "start", directory, str(_free_port())], capture_output=True, text=True
            )
            if started.returncode == 0:
                break
        if started.returncode != 0:
            pytest.fail(f"cannot start Redis: {started.stderr.strip()}", pytrace=False)
        yield started.stdout.strip()
    finally:
        subprocess.run([REDIS_SH, "stop", directory], check=True)
