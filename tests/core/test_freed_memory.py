"""Memory freed between kept allocations goes back to the system (core.freed_memory, glibc's malloc_trim):
the streaming engine calls it after every block, so a deeper model does not keep each block's freed
temporaries resident."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.freed_memory import return_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc (Linux)")


def rss_anon() -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_freed_blocks_between_kept_ones_are_returned():
    return_freed_memory()  # what earlier tests freed is not counted as this test's
    before = rss_anon()
    blocks = [bytearray(100_000) for _ in range(4000)]  # 400 MB below malloc's mmap threshold
    kept = blocks[::2]
    del blocks
    assert return_freed_memory()
    grown = rss_anon() - before
    assert 150e6 < grown < 300e6, grown  # the 200 MB kept stay, the 200 MB freed between them do not
    assert len(kept) == 2000
