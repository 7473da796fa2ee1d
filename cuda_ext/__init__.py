"""Optional compiled kernels for SqueezeLinear, each with a plain-torch twin in ``core.kernels``.

Every kind of kernel ("cpu", "cuda") lives in its own module that exposes two functions:

* ``missing_requirement() -> str | None``: why it cannot be built here (no compiler, no GPU...),
  checked cheaply and without compiling; None when a build may be attempted;
* ``build() -> object``: compile (JIT, cached on disk) and load it, registering its torch ops;
  raises on failure.

``load(kind)`` builds on first use, remembers the result or the failure for the life of the
process (a failed build is never retried every call) and logs one warning line when the kind is
unavailable, after which the caller's torch reference serves. Nothing here compiles at import.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

# kind -> module implementing missing_requirement() and build()
_MODULES = {"cpu": "cuda_ext.cpu", "cuda": "cuda_ext.ops"}

_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}
_lock = threading.Lock()


def _module(kind: str):
    if kind not in _MODULES:
        raise ValueError(f"unknown kernel kind {kind!r}: choose one of {sorted(_MODULES)}")
    try:
        return importlib.import_module(_MODULES[kind])
    except ImportError as exc:
        if exc.name != _MODULES[kind]:
            raise
        return None


def load(kind: str = "cpu"):
    """The loaded kernels of ``kind`` (building them on first use), or None when unavailable.

    Thread-safe; the first failure is logged once and remembered (see ``unavailable_reason``).
    """
    loaded = _loaded.get(kind)  # lock-free fast path: this runs on every quantized layer call
    if loaded is not None:
        return loaded
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            return None
        module = _module(kind)
        reason = (f"the {kind} kernels are not part of this installation" if module is None
                  else module.missing_requirement())
        if reason is None:
            try:
                _loaded[kind] = module.build()
                return _loaded[kind]
            except Exception as exc:  # a compiler error must never stop the app: the reference serves
                reason = f"building them failed ({_first_line(exc)})"
        _failed[kind] = reason
        log.warning("squeeze %s kernels unavailable, using the torch reference: %s", kind, reason)
        return None


def is_available(kind: str = "cpu") -> bool:
    """True when the ``kind`` kernels are built and loaded (builds them on the first call)."""
    return load(kind) is not None


def unavailable_reason(kind: str = "cpu") -> str | None:
    """Why ``kind`` is unavailable (None when it works); builds on the first call like ``is_available``."""
    load(kind)
    return _failed.get(kind)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if "error" in line.lower()] or text.splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"
