"""core must never pull in Qt or initialise CUDA (DESIGN.md: imports flow down)."""

import subprocess
import sys

MODULES = ["core", "core.config", "core.quantize", "core.checkpoint", "core.pipeline", "core.cli",
           "core.cli_commands", "core.preview", "core.sensitivity", "core.outliers", "core.models", "core.data"]


def test_core_imports_without_qt_or_cuda():
    code = (
        "import sys, importlib\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'superqt', 'studio', 'shiboken6')]\n"
        "import torch\n"
        "print('BAD', bad, 'CUDA', torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "BAD [] CUDA False"
