"""Temporary files and folders that say who made them, so a killed run's leftovers can be swept.

Everything written in place of a final file first (a Fisher cache file, the converted demo model, an
export) goes to a hidden name that embeds the writer's host and process id::

    .{name}.{host}-{pid}.{kind}        e.g. .model-f16.gguf.box-4242.partial

A run killed with SIGKILL or by the out-of-memory killer cannot clean up after itself; the next run
that writes into the same folder calls ``sweep(folder)`` and removes what dead processes left there.
A name is removed only when its owner is certainly dead: the same host and a pid that no longer runs.
Another live process's work, another host's (a shared network folder) and any name this module did not
make are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

KINDS = ("partial", "tmp")
# ".{name}.{host}-{pid}.{kind}": the host is matched in owner_is_dead, so names with dots stay unambiguous.
_NAME = re.compile(r"^\.(?P<head>.+)-(?P<pid>\d+)\.(?P<kind>[a-z]+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def temp_name(name: str, kind: str = "partial") -> str:
    """The hidden name under which this process writes ``name`` before renaming it into place.

    kind: "partial" for folders and large outputs, "tmp" for cache files (``sweep``'s defaults).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return f".{name}.{_host()}-{os.getpid()}.{kind}"


def temp_path(final: str | os.PathLike, kind: str = "partial") -> Path:
    """``temp_name`` beside ``final``: where to write before ``os.replace(temp, final)``."""
    final = Path(final)
    return final.with_name(temp_name(final.name, kind))


def owner_is_dead(name: str) -> bool:
    """True only for a ``temp_name`` of this host whose process no longer runs.

    False for a live owner (this process included), for another host's name (its processes cannot be
    seen from here) and for any name ``temp_name`` did not make.
    """
    match = _NAME.match(name)
    if match is None or match.group("kind") not in KINDS:
        return False
    if not match.group("head").endswith("." + _host()):
        return False
    return not pid_alive(int(match.group("pid")))


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    except OSError:
        return True  # cannot tell: keep its files
    return True


def sweep(folder: str | os.PathLike, patterns: Iterable[str] = ("*.partial", "*.tmp")) -> list[Path]:
    """Remove the leftovers of dead owners matching ``patterns`` directly inside ``folder``.

    Returns what was removed. A missing folder, or an entry that vanishes or cannot be removed
    meanwhile, is skipped: sweeping never fails the run that does it.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    candidates = {path for pattern in patterns for path in folder.glob(pattern)}
    for path in sorted(candidates):
        if not owner_is_dead(path.name):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed
