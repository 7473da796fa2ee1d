"""Long work in the studio: cancel leaves nothing behind, errors become clear dialogs, closing during a
job asks and cancels cleanly, and only one heavy job runs at a time."""

from __future__ import annotations

import time

import pytest

from core.errors import UserError
from tests.studio.helpers import open_model, small_calibration, wait_idle


@pytest.fixture
def slow_quantize(monkeypatch):
    """Make every quantized matrix take 0.2 s longer, so that a cancel lands mid-run for sure."""
    import core.stream_quantize

    original = core.stream_quantize.quantize_matrix_widths

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)

    monkeypatch.setattr(core.stream_quantize, "quantize_matrix_widths", slow)


def _start_quantize(qtbot, window, tiny_model_dir, corpus_file, output):
    assert open_model(qtbot, window, tiny_model_dir) == "done"
    wait_idle(qtbot, window)
    small_calibration(window, corpus_file)
    window.show_page("quantize")
    page = window.pages["quantize"]
    page.output_picker.set_value(str(output))
    assert page.run_button.click() is None and window.runner.busy
    qtbot.waitUntil(lambda: any(page.layers_table.item(r, 1).text() == "working…"
                                for r in range(page.layers_table.rowCount())), timeout=60000)
    return page


def test_cancel_during_quantize_leaves_no_folder(qtbot, window, tiny_model_dir, corpus_file, tmp_path, slow_quantize):
    output = tmp_path / "out" / "tiny-sq4"
    page = _start_quantize(qtbot, window, tiny_model_dir, corpus_file, output)
    assert not page.run_button.isEnabled()  # no second run while one is going
    assert not window.pages["model"].demo_button.isEnabled()
    started = time.perf_counter()
    with qtbot.waitSignal(window.runner.finished, timeout=10000) as blocker:
        page.panel.cancel_button.click()
    assert blocker.args[1] == "cancelled"
    assert time.perf_counter() - started < 5  # stops within seconds
    assert not output.exists()
    assert not output.parent.exists() or list(output.parent.iterdir()) == []  # no partial folder either
    assert "Cancelled" in page.result_label.text()
    assert page.run_button.isEnabled()
    assert window.session.results == []


def test_closing_during_a_job_asks_then_cancels_cleanly(qtbot, window, tiny_model_dir, corpus_file, tmp_path,
                                                        slow_quantize, monkeypatch):
    output = tmp_path / "tiny-sq4"
    _start_quantize(qtbot, window, tiny_model_dir, corpus_file, output)
    asked = []
    monkeypatch.setattr(window, "confirm_close", lambda: asked.append(1) or False)
    window.close()  # the person answers "no": the job goes on
    assert asked and window.isVisible() and window.runner.busy and not window.runner.cancelling
    monkeypatch.setattr(window, "confirm_close", lambda: asked.append(2) or True)
    window.close()  # "yes": cancel, then close once the job has stopped
    assert window.isVisible() and window.runner.cancelling
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=10000)
    assert not window.runner.busy
    assert not output.exists()


def test_bad_folder_shows_a_clear_message_and_the_app_keeps_running(qtbot, window, tmp_path, tiny_model_dir):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with qtbot.waitSignal(window.reporter.shown, timeout=10000) as shown:
        assert open_model(qtbot, window, empty) == "failed"
    message = shown.args[0]
    assert "config.json" in message and str(empty) in message
    assert "Traceback" not in message
    dialog = window.reporter.last_dialog
    assert dialog.isVisible() and dialog.informativeText() == message
    dialog.accept()
    assert not window.runner.busy and window.session.model is None
    assert window.pages["model"].demo_button.isEnabled()
    assert open_model(qtbot, window, tiny_model_dir) == "done"  # still usable


def test_unexpected_error_names_the_log_file(qtbot, window, monkeypatch, studio_home, tiny_model_dir):
    import core.lazy_model

    def broken(folder, *args, **kwargs):
        raise RuntimeError("tensor shapes do not match")  # superqt would swallow a RuntimeError

    monkeypatch.setattr(core.lazy_model.LazyModel, "open", staticmethod(broken))
    with qtbot.waitSignal(window.reporter.shown, timeout=10000) as shown:
        assert open_model(qtbot, window, tiny_model_dir) == "failed"
    message = shown.args[0]
    assert "Unexpected error" in message and "tensor shapes do not match" in message
    log = studio_home / "data" / "studio.log"
    assert str(log) in message
    assert "Traceback" in log.read_text() and "broken" in log.read_text()


def test_one_heavy_job_at_a_time(qtbot, window):
    def slow_job():
        for _ in range(50):
            time.sleep(0.02)
            yield
        return "first"

    results = []
    assert window.runner.run("First job", slow_job, on_result=results.append)
    with qtbot.waitSignal(window.reporter.shown, timeout=2000) as shown:
        assert not window.runner.run("Second job", slow_job, on_result=results.append)
    assert "First job" in shown.args[0]
    qtbot.waitUntil(lambda: not window.runner.busy, timeout=10000)
    assert results == ["first"]


def test_user_error_inside_a_job_is_shown_as_is(qtbot, window):
    def failing():
        yield
        raise UserError("the calibration text is too short: use a longer file")

    with qtbot.waitSignal(window.reporter.shown, timeout=5000) as shown:
        window.runner.run("Checking", failing)
    assert shown.args[0] == "the calibration text is too short: use a longer file"
    qtbot.waitUntil(lambda: not window.runner.busy)
