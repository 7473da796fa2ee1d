"""Can this output be written? Answered before the long work, by trying, so a run never fails at its end.

Every command that writes (quantize, import, export in each format, the studio's jobs) calls
``check_output_path`` first. It refuses, with the problem and the fix in one line: a path below an
existing file (``/etc/passwd/x``), a virtual file system (``/proc``, ``/sys``, ``/dev``), an output that
exists (unless overwriting) or has the wrong kind (a file where a folder goes, or the reverse), and any
folder the operating system will not let us create or write into. The writability test is real: the
missing parent folders are created and a probe file is written and removed, then the folders created
for the probe are removed again, so the check leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from core.errors import UserError
from core.litter import temp_name

# Kernel interfaces that look like folders; nothing we write belongs there (as root, writes may even work).
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_path(output: str | os.PathLike, *, overwrite: bool = False, kind: str = "folder") -> Path:
    """The absolute ``output`` path, once it is known that it can be written; UserError otherwise.

    kind: "folder" (a model folder: an existing non-empty folder needs ``overwrite``) or "file" (one
    file such as a .gguf: an existing file needs ``overwrite``). Leaves the file system as it was.
    """
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', not {kind!r}")
    output = Path(output).expanduser().absolute()
    _check_not_virtual(output)
    _check_existing(output, overwrite, kind)
    _check_folders_above(output)
    _probe(output.parent)
    return output


def _check_not_virtual(output: Path) -> None:
    resolved = output.resolve()
    for root in VIRTUAL_ROOTS:
        if resolved == root or root in resolved.parents:
            raise UserError(f"cannot write {output}: {root} is not a disk folder but the kernel's view of the system; "
                            "choose an output in your home or project folder")


def _check_existing(output: Path, overwrite: bool, kind: str) -> None:
    noun = "folder name for the quantized model" if kind == "folder" else "file name"
    if kind == "folder":
        if output.exists() and not output.is_dir():
            raise UserError(f"output {output} is a file: choose a {noun}")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            raise UserError(f"output folder {output} already exists and is not empty: choose another folder or "
                            "allow overwriting (--overwrite)")
    else:
        if output.is_dir():
            raise UserError(f"output {output} is a folder: choose a {noun}, like {output / 'model.gguf'}")
        if output.exists() and not overwrite:
            raise UserError(f"{output} already exists: choose another file name or allow overwriting (--overwrite)")


def _check_folders_above(output: Path) -> None:
    """A path component that exists but is not a folder makes every write below it fail."""
    for above in reversed(output.parents):
        if above.exists() and not above.is_dir():
            raise UserError(f"cannot write {output}: {above} is a file, not a folder: choose an output path "
                            "whose folders are folders")


def _probe(parent: Path) -> None:
    """Create ``parent`` (and what is missing above it), write and remove a probe file, undo the folders."""
    created: list[Path] = []
    try:
        for folder in reversed([parent, *parent.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        probe = parent / temp_name("squeeze-probe", "tmp")  # a kill right here leaves litter sweep() knows
        with open(probe, "wb") as handle:
            handle.write(b"probe")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write into {parent} ({_reason(exc)}): choose an output folder you can write "
                        "to") from exc
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # someone else put something there meanwhile: theirs to keep


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on the disk"
    return exc.strerror or type(exc).__name__
