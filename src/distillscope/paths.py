"""Where distillscope keeps what it can rebuild (converted models, parsed prompts, exchanges), and
how it writes a file or folder that a reader must never see half written."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """The cache root (``$DISTILLSCOPE_CACHE`` or the user cache dir), or a folder inside it."""
    root = os.environ.get("DISTILLSCOPE_CACHE") or platformdirs.user_cache_dir("distillscope")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(target: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A staging path beside ``target`` to write a file or a folder into; once the block ends
    it replaces ``target`` in one rename, so a reader sees the old one or the whole new one.

    The staging name is a dot-name (``.NAME.tmp-PID-THREAD``) that readers skip, its own per
    writer; a leftover of that name is removed first, and the staging path is removed if the
    block raises. ``fsync`` flushes a staged file to disk before the rename. A staged folder
    replaces a folder ``target`` that already exists.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _remove(staging)
    try:
        yield staging
        if fsync:
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
        if staging.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        _remove(staging)
        raise


def write_text_atomically(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` through ``atomic_path``."""
    with atomic_path(target) as staging:
        staging.write_text(text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_database_url(where: str | os.PathLike) -> bool:
    """Whether ``where`` names a PostgreSQL database rather than a file."""
    return str(where).startswith(("postgresql://", "postgres://"))


def masked_url(url: str) -> str:
    """A database URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"
