"""``squeeze-studio [--model SPEC]``: start the desktop studio. Nothing runs at import."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="squeeze-studio", description="Squeeze Studio: inspect, quantize, "
                                     "evaluate and chat with SqueezeLLM-quantized language models.")
    parser.add_argument("--model", metavar="SPEC",
                        help="open a model at start: 'demo', a model folder, a .gguf file, a quantized folder, "
                             "or a hub name org/model")
    return parser.parse_args(argv)


def create_window(model: str | None = None):
    """The application object (created if needed) and a shown MainWindow; opens ``model`` when given."""
    from PySide6.QtWidgets import QApplication

    from studio import storage
    from studio.resources import icon, stylesheet

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(storage.ORGANIZATION)
    app.setApplicationName(storage.APPLICATION)
    app.setWindowIcon(icon("app"))
    app.setStyle("Fusion")  # the stylesheet is written against Fusion, the same on every platform
    app.setStyleSheet(stylesheet())

    from studio.gc_guard import GuiThreadGarbageCollector
    from studio.main_window import MainWindow

    if not hasattr(app, "_squeeze_gc"):
        app._squeeze_gc = GuiThreadGarbageCollector(app)
    window = MainWindow()
    _report_uncaught_errors(window)
    window.show()
    if model:
        window.open_model(model)
    return app, window


def _report_uncaught_errors(window) -> None:
    """An exception in a GUI-thread slot becomes the error dialog (and the log), not a silent crash."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (KeyboardInterrupt, SystemExit)):
            previous(kind, value, tb)
            return
        try:
            window.reporter.report(value.with_traceback(tb), "handling that action")
        except RuntimeError:  # the window is already gone
            previous(kind, value, tb)

    sys.excepthook = hook


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    app, _window = create_window(args.model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
