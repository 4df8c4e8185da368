"""Where distillscope keeps what it can rebuild: converted models, parsed prompts, exchanges."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """The cache root (``$DISTILLSCOPE_CACHE`` or the user cache dir), or a folder inside it."""
    root = os.environ.get("DISTILLSCOPE_CACHE") or platformdirs.user_cache_dir("distillscope")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
