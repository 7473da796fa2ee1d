"""Just-in-time builds with torch.utils.cpp_extension, cached per torch version, source and flags.

The cache root follows core.paths (without importing core, which sits above this package):
``$SQUEEZE_CACHE_DIR``, else ``$XDG_CACHE_HOME/squeeze-studio``, else ``~/.cache/squeeze-studio``;
builds go to ``<root>/kernels/<torch version>/<name>_<hash of sources and flags>``. A folder
whose build failed keeps a ``FAILED`` file with the compiler's message, so later processes skip
the compile (delete the file, or change the source or flags, to try again).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"


def cache_root() -> Path:
    """``<squeeze cache>/kernels/<torch version>`` (not created here)."""
    import torch

    explicit = os.environ.get("SQUEEZE_CACHE_DIR")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "squeeze-studio"
    return root / "kernels" / torch.__version__.replace("+", "_")


def compiler_missing() -> str | None:
    """Why no C++ toolchain can be used here, or None (cheap: looks up executables only)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({compiler} / g++ not on PATH): install g++ to get the fast kernels"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts a ninja binary beside it)
        except ImportError:
            return "ninja is missing: `pip install ninja` to get the fast kernels"
    return None


def build_folder(name: str, sources: list[Path], flags: list[str]) -> tuple[str, Path]:
    """(module name, build folder) keyed by the bytes of the sources (and headers) and the flags."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update("\0".join(flags).encode())
    tag = digest.hexdigest()[:12]
    return f"{name}_{tag}", cache_root() / f"{name}_{tag}"


def build(name: str, sources: list[Path], cflags: list[str], ldflags: list[str], headers: list[Path] = (),
          **kwargs) -> str:
    """Compile ``sources`` into a shared library loaded into this process (its TORCH_LIBRARY ops register).

    headers: files the sources include (part of the cache key). Returns the library's path.
    Raises RuntimeError with the compiler's message on failure, and immediately when an earlier
    process recorded a failure of the same build.
    """
    from torch.utils import cpp_extension

    keyed_flags = cflags + ldflags + [f"{key}={value}" for key, value in sorted(kwargs.items())]
    module_name, folder = build_folder(name, [*sources, *headers], keyed_flags)
    failed = folder / "FAILED"
    if failed.exists():
        raise RuntimeError(f"an earlier build failed (see {failed}; delete it to retry): "
                           f"{failed.read_text()[:300]}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=module_name, sources=[str(s) for s in sources], extra_cflags=cflags,
                                  extra_ldflags=ldflags, build_directory=str(folder), is_python_module=False,
                                  verbose=False, **kwargs)
    except Exception as exc:
        failed.write_text(str(exc))
        raise RuntimeError(str(exc)) from exc
