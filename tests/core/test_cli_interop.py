from tests.core.test_cli import run_cli, text_file, tiny_folder  # noqa: F401  (fixtures)


def test_export_hf_dense_then_compare(capsys, tmp_path, tiny_folder, text_file):  # noqa: F811
    q = tmp_path / "q4"
    assert run_cli(capsys, "quantize", tiny_folder, "--bits", "4", "--calibration", text_file, "--samples", "2",
                   "--seqlen", "32", "--output", q)[0] == 0
    code, stdout, _ = run_cli(capsys, "export", q, "--format", "hf-dense", "--dtype", "float32",
                              "--output", tmp_path / "dense")
    assert code == 0 and "squeeze eval" in stdout
    code, stdout, _ = run_cli(capsys, "eval", q, tmp_path / "dense", "--text", text_file, "--windows", "2",
                              "--seqlen", "64")
    rows = [line for line in stdout.splitlines() if line.startswith("| ")][1:]
    ppl = [float(r.split("|")[2]) for r in rows]
    assert code == 0 and abs(ppl[0] - ppl[1]) / ppl[0] < 1e-3  # the dequantized export predicts the same


def test_export_refusals_are_one_line(capsys, tmp_path, tiny_folder, text_file):  # noqa: F811
    q = tmp_path / "q3"
    run_cli(capsys, "quantize", tiny_folder, "--bits", "3", "--calibration", text_file, "--samples", "2",
            "--seqlen", "32", "--output", q)
    code, _, err = run_cli(capsys, "export", q, "--format", "squeezellm-pt", "--output", tmp_path / "pt")
    assert code == 2 and "4-bit" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "import", tmp_path / "missing.pt", "--output", tmp_path / "imp")
    assert code == 2 and "missing.pt" in err and not (tmp_path / "imp").exists()
