"""Where Squeeze Studio keeps what it can rebuild: converted models, corpora, token caches, Fisher files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root, created on demand.

    ``$SQUEEZE_CACHE_DIR`` wins (tests and users with a small home); else
    ``$XDG_CACHE_HOME/squeeze-studio``; else ``~/.cache/squeeze-studio``.
    """
    explicit = os.environ.get("SQUEEZE_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "squeeze-studio"
    root.mkdir(parents=True, exist_ok=True)
    return root
