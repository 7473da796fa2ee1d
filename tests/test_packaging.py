"""The wheel carries what an installed studio needs: its icons and stylesheet, the kernel sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_resource_file_and_kernel_source(tmp_path):
    source = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("core", "studio", "cuda_ext", "bench", "resources"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("squeeze_studio-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(ROOT).as_posix() for folder in ("resources", "cuda_ext/csrc")
              for p in (ROOT / folder).rglob("*") if p.is_file()}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert "studio/resources.py" in names and "core/cli.py" in names
