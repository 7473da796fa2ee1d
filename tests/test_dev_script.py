"""scripts/dev.sh names the one apt-get command for the system libraries Qt's xcb plugin needs (issue 18,
item 11), and says nothing when they are all there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "dev.sh"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the check runs on Linux only")


def _libraries() -> list[tuple[str, str]]:
    block = re.search(r"QT_XCB_LIBS=\((.*?)\)", SCRIPT.read_text(), re.S).group(1)
    return [tuple(entry.split(":")) for entry in block.split()]


def _run(tmp_path: Path, present: list[str]) -> subprocess.CompletedProcess:
    """``dev.sh studio-libs`` with an ldconfig that knows only ``present``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cache = "".join(f"\t{lib} (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/{lib}\\n" for lib in present)
    fake = bin_dir / "ldconfig"
    fake.write_text(f'#!/bin/sh\nprintf "{len(present)} libs found in cache\\n{cache}"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), "studio-libs"], capture_output=True, text=True, env=env, timeout=60)


def test_a_bare_machine_gets_one_apt_get_command(tmp_path):
    libraries = _libraries()
    assert ("libxcb-cursor.so.0", "libxcb-cursor0") in libraries and ("libGL.so.1", "libgl1") in libraries
    present = [lib for lib, _ in libraries if lib not in ("libxcb-cursor.so.0", "libxkbcommon-x11.so.0")]
    result = _run(tmp_path, present)
    assert result.returncode == 1
    commands = [line.strip() for line in result.stderr.splitlines() if "apt-get" in line]
    assert commands == ["sudo apt-get install -y libxcb-cursor0 libxkbcommon-x11-0"]


def test_nothing_is_said_when_every_library_is_there(tmp_path):
    result = _run(tmp_path, [lib for lib, _ in _libraries()])
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_the_studio_command_checks_before_starting_and_test_is_unchanged():
    text = SCRIPT.read_text()
    studio = text[text.index("  studio)"):text.index("  studio-libs)")]
    assert studio.index("check_studio_libraries") < studio.index("exec")
    test = text[text.index("  test)"):text.index("  *)")]
    assert "check_studio_libraries" not in test
