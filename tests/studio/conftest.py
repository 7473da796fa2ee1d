"""Studio fixtures: a fresh settings folder per test, a tiny saved model, a small text file, a main window,
and a guard that fails any test leaving a worker thread running."""

from __future__ import annotations

import gc

import pytest

CORPUS_SENTENCES = (
    "The river flows past the old mill and into the valley where farmers grow wheat and barley.",
    "In 1897 the town council voted to build a stone bridge across the river near the market square.",
    "Scientists measured the temperature of the lake every morning for three years and published the data.",
    "A small library opened on the hill, lending books about history, astronomy, music and cooking.",
    "During the winter the roads were closed, so the villagers traded bread, cheese and firewood.",
    "The orchestra performed a new symphony, and the audience applauded for several minutes.",
)


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Settings, runs table and log in a temporary folder, never the person's real ones."""
    home = tmp_path / "studio-home"
    monkeypatch.setenv("SQUEEZE_STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="package", autouse=True)
def gui_thread_gc(qapp):
    """As in the app: cyclic garbage (Qt wrappers of closed windows) is collected on the GUI thread only."""
    from studio.gc_guard import GuiThreadGarbageCollector

    guard = GuiThreadGarbageCollector()
    yield guard
    guard.stop()


@pytest.fixture(autouse=True)
def no_dangling_workers(qapp):
    """Fail a test that leaves a worker thread running (after giving it a few seconds to end)."""
    from PySide6.QtCore import QThreadPool
    from superqt.utils._qthreading import WorkerBase

    yield
    pool = QThreadPool.globalInstance()
    finished = pool.waitForDone(10000)
    qapp.processEvents()
    running = [w for w in WorkerBase._worker_set if w.is_running]
    if not finished or running:
        for worker in list(WorkerBase._worker_set):
            worker.quit()
        pool.waitForDone(10000)
        pytest.fail(f"a worker thread was left running ({pool.activeThreadCount()} active)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A tiny random LLaMA saved as a model folder with the demo tokenizer (loads in about a second)."""
    from tests.conftest import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small plain-text corpus (~9k tokens) for calibration and evaluation."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    paragraphs = []
    for i in range(60):
        sentences = [CORPUS_SENTENCES[(i + k) % len(CORPUS_SENTENCES)] for k in range(4)]
        paragraphs.append(f"Paragraph {i}. " + " ".join(sentences))
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


@pytest.fixture
def window(qtbot):
    """A MainWindow; at the end it is closed the way a person closes it (a running job is cancelled)."""
    from studio.main_window import MainWindow

    main = MainWindow()
    main.confirm_close = lambda: True  # "cancel the job and quit?" -> yes (tests may replace it)
    main.show()
    yield main
    main.close()
    qtbot.waitUntil(lambda: not main.runner.busy and not main.isVisible(), timeout=30000)
    main.deleteLater()
    gc.collect()  # here, on the GUI thread, not later in some worker


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory, tiny_model_dir, corpus_file):
    """The tiny model quantized to 4 bits by the core pipeline (a folder the studio can open)."""
    from core.config import CalibrationConfig
    from core.pipeline import QuantizeJob, run_quantize_job
    from core.progress import run_to_end

    output = tmp_path_factory.mktemp("quantized") / "tiny-sq4"
    job = QuantizeJob(model=str(tiny_model_dir), output=output, device="cpu",
                      calibration=CalibrationConfig(source=str(corpus_file), samples=2, seqlen=64))
    run_to_end(run_quantize_job(job))
    return output
