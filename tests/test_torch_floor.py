"""pyproject's torch floor is at least the release that added every torch API the code calls."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch API -> the first release that has it. Add a row when the code starts using a newer API.
INTRODUCED = {
    "torch.OutOfMemoryError": (2, 5),
    "torch.library.register_fake": (2, 4),
    "torch.library.custom_op": (2, 4),
    "torch.compiler.is_compiling": (2, 3),
    "torch.accelerator": (2, 6),
    "torch.serialization.add_safe_globals": (2, 4),
}


def _torch_floor() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert match, "pyproject.toml must give torch a floor (torch>=X.Y)"
    return int(match.group(1)), int(match.group(2))


def _used_apis() -> dict[str, str]:
    used = {}
    for folder in ("core", "cuda_ext", "studio"):
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            for api in INTRODUCED:
                if api in source:
                    used.setdefault(api, str(path.relative_to(ROOT)))
    return used


def test_torch_floor_covers_every_api_the_code_uses():
    floor = _torch_floor()
    used = _used_apis()
    assert "torch.OutOfMemoryError" in used  # the reason for the floor: the table is not stale
    too_new = {api: f"{INTRODUCED[api]} in {where}" for api, where in used.items() if INTRODUCED[api] > floor}
    assert not too_new, f"pyproject allows torch {floor} but the code uses newer APIs: {too_new}"
