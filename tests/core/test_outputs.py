"""Outputs that cannot be written are refused before any long work, in every writing command, and the
check leaves nothing behind (issue 18, item 1)."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest

from core.errors import UserError
from core.outputs import check_output_path
from tests.core.test_cli import one_line_error, run_cli, text_file, tiny_folder  # noqa: F401  (fixtures)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_path_below_a_file_is_refused(a_file, kind):
    with pytest.raises(UserError, match=rf"{a_file} is a file, not a folder"):
        check_output_path(a_file / "deeper" / "model.gguf", kind=kind)


@pytest.mark.parametrize("path", ["/proc/squeeze-out", "/sys/kernel/squeeze-out", "/proc/self/x/y"])
def test_virtual_file_systems_are_refused(path):
    with pytest.raises(UserError, match="not a disk folder"):
        check_output_path(path)


def test_unwritable_folders_are_refused_with_the_reason(tmp_path, monkeypatch):
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if ".squeeze-probe." in str(file):  # core.litter.temp_name("squeeze-probe", "tmp")
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)  # as root, chmod alone would not stop a write
    with pytest.raises(UserError, match=r"cannot write into .*\(permission denied\)"):
        check_output_path(tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []  # the folders created for the probe were removed


def test_a_writable_output_passes_and_nothing_is_left_behind(tmp_path):
    out = check_output_path(tmp_path / "a" / "b" / "out")
    assert out == tmp_path / "a" / "b" / "out" and list(tmp_path.iterdir()) == []
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        check_output_path(tmp_path / "existing")
    check_output_path(tmp_path / "existing", overwrite=True)
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(tmp_path / "existing", kind="file")
    with pytest.raises(UserError, match="is a file"):
        check_output_path(tmp_path / "existing" / "f", kind="folder")
    assert sorted(os.listdir(tmp_path / "existing")) == ["f"]


# ---------------------------------------------------------------- every writing command, before its long work


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_folder, text_file):  # noqa: F811
    from core.cli import main

    out = tmp_path_factory.mktemp("q") / "q4"
    assert main(["-q", "quantize", str(tiny_folder), "--bits", "4", "--calibration", str(text_file),
                 "--samples", "2", "--seqlen", "32", "--output", str(out)]) == 0
    return out


@pytest.fixture
def no_long_work(monkeypatch):
    """Loading a model is where the long work starts: a refused output must never get there."""
    import core.checkpoint
    import core.models

    def fail(*args, **kwargs):
        raise AssertionError("the output was checked only after loading the model")

    monkeypatch.setattr(core.models, "load_model", fail)
    monkeypatch.setattr(core.checkpoint, "load_quantized", fail)


@pytest.mark.parametrize("bad", ["{file}/x", "/proc/squeeze-out"])
@pytest.mark.parametrize("command", [
    ["quantize", "{model}", "--samples", "2", "--seqlen", "32"],
    ["export", "{quantized}", "--format", "hf-dense"],
    ["export", "{quantized}", "--format", "squeezellm-pt"],
    ["import", "{file}", "--base", "{model}"],
])
def test_writing_commands_refuse_a_bad_output_in_one_line(capsys, a_file, tiny_folder, quantized,  # noqa: F811
                                                           no_long_work, command, bad):
    values = {"file": a_file, "model": tiny_folder, "quantized": quantized}
    args = [part.format(**values) for part in command] + ["--output", bad.format(**values)]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert "cannot write" in one_line_error(err)


@pytest.mark.parametrize("bad", ["{file}/model.gguf", "/proc/model.gguf"])
def test_gguf_export_refuses_a_bad_output_in_one_line(capsys, a_file, quantized, no_long_work, bad):
    code, _, err = run_cli(capsys, "export", quantized, "--format", "gguf", "--output", bad.format(file=a_file))
    assert code == 2 and "cannot write" in one_line_error(err)


def test_cli_paths_are_plain_paths():
    assert isinstance(check_output_path("relative-out-xyz"), Path)
    assert not Path("relative-out-xyz").exists()
