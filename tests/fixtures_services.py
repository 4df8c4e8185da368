"""Real services for tests: a throwaway PostgreSQL cluster, started by scripts/postgres.sh."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_SH = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database for this session; fails (never skips) without one."""
    # Under /tmp rather than pytest's tmp_path: as root the server runs as the `postgres` user,
    # who cannot enter pytest's private folders.
    folder = tempfile.mkdtemp(prefix="distillscope-pg-")
    try:
        for _ in range(3):  # a free port can be taken before the server binds it
            start = subprocess.run(
                ["bash", str(POSTGRES_SH), "start", folder, str(_free_port())],
                capture_output=True,
                text=True,
                timeout=600,  # the first run may install PostgreSQL with apt-get
            )
            if start.returncode == 0:
                break
        else:
            pytest.fail(f"cannot start PostgreSQL: {start.stderr.strip()}", pytrace=False)
        yield start.stdout.strip()
    finally:
        subprocess.run(["bash", str(POSTGRES_SH), "stop", folder], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
