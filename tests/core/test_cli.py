import json
import subprocess
import sys

import pytest

from core.cli import main
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, demo_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(f"The river number {i} flows into the sea near town {i % 17}." for i in range(400)))
    return path


def run_cli(capsys, *args):
    try:
        code = main(["-q", *map(str, args)])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_quantize_info_inspect_on_a_tiny_model(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "q3"
    code, stdout, _ = run_cli(capsys, "quantize", tiny_folder, "--bits", "3", "--calibration", text_file,
                              "--samples", "2", "--seqlen", "32", "--output", out)
    assert code == 0 and "bits per weight" in stdout
    assert (out / "model.safetensors").is_file()
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "3 bits" in stdout and "14 quantized" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", tiny_folder, "--outlier-range", "1.5", "--json",
                              "--calibration", text_file, "--samples", "2", "--seqlen", "32")
    data = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and len(data["layers"]) == 14 and data["range_multiplier"] == 1.5


@pytest.mark.parametrize("args,words", [
    (["quantize", "/no/such/model", "--output", "{tmp}/o"], "/no/such/model"),
    (["quantize", "{model}", "--bits", "7", "--output", "{tmp}/o"], "invalid choice"),
    (["quantize", "{model}", "--sensitivity", "50", "--output", "{tmp}/o"], "percent"),
    (["quantize", "{model}", "--outlier-range", "1", "--outlier-percent", "1", "--output", "{tmp}/o"],
     "not allowed with"),
    (["quantize", "{model}", "--calibration", "/no/such.txt", "--output", "{tmp}/o"], "/no/such.txt"),
    (["quantize", "{model}", "--output", "{tmp}/full"], "already exists"),
    (["quantize", "{model}", "--device", "cuda", "--output", "{tmp}/o"], "cuda"),
    (["info", "{tmp}"], "config.json"),
    (["info", "{model}"], "not a SqueezeLLM"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_folder, args, words):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = [a.format(tmp=tmp_path, model=tiny_folder) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert words in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_console_script_runs_and_reports_usage_errors():
    proc = subprocess.run([sys.executable, "-m", "core.cli", "quantize"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "required" in one_line_error(proc.stderr)
