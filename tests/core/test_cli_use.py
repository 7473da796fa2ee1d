import subprocess
import sys

import pytest

from tests.core.test_cli import run_cli, text_file, tiny_folder  # noqa: F401  (fixtures)


def test_eval_compare_prints_one_table_with_both_models(capsys, tmp_path, tiny_folder, text_file):  # noqa: F811
    out = tmp_path / "q4"
    code, _, _ = run_cli(capsys, "quantize", tiny_folder, "--bits", "4", "--calibration", text_file,
                         "--samples", "2", "--seqlen", "32", "--output", out)
    assert code == 0
    code, stdout, _ = run_cli(capsys, "eval", tiny_folder, out, "--compare", "--text", text_file,
                              "--windows", "2", "--seqlen", "64")
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert code == 0 and len(lines) == 4  # header, rule, two models
    assert "1.000x" in lines[2] and "q4" in lines[3]


def test_chat_through_stdin_with_commands(tiny_folder):  # noqa: F811
    script = "hello there\n/system You are terse.\n/reset\nsecond question\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "core.cli", "chat", str(tiny_folder), "--temperature", "0",
                           "--max-new-tokens", "5"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tokens/s") == 2  # two answers, each with its speed
    assert "(system prompt: 'You are terse.')" in proc.stderr and "(new conversation)" in proc.stderr


@pytest.mark.parametrize("args,words", [(["chat", "/nope"], "/nope"), (["eval", "demo", "--windows", "0"], "windows")])
def test_use_commands_bad_input(capsys, args, words):
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err
