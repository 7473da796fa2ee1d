"""Steps shared by the studio tests: start a job through a widget and wait for it to end."""

from __future__ import annotations


def run_and_wait(qtbot, window, start, timeout: int = 60000) -> str:
    """Call ``start()`` (which starts a job) and wait for the job to end; returns its outcome."""
    with qtbot.waitSignal(window.runner.finished, timeout=timeout) as blocker:
        start()
    return blocker.args[1]


def open_model(qtbot, window, spec) -> str:
    page = window.pages["model"]
    page.spec_edit.setText(str(spec))
    return run_and_wait(qtbot, window, page.open_button.click)


def wait_idle(qtbot, window, timeout: int = 60000) -> None:
    """Wait until no job runs (e.g. the automatic analysis after a load has ended)."""
    qtbot.wait(50)
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=timeout)


def small_calibration(window, corpus) -> None:
    """2 windows of 64 tokens of the test corpus, set through the Quantize page's form."""
    form = window.pages["quantize"].calibration_form
    form.editors["source"].set_value(str(corpus))
    form.editors["samples"].setValue(2)
    form.editors["seqlen"].setValue(64)
