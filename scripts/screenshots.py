"""Screenshots of every studio page, taken the way a person would get there.

Opens the app (offscreen unless a display is set), loads the demo model (or a tiny random model with
--model tiny), computes sensitivity, quantizes, evaluates and chats, and saves
docs/screenshots/<page>.png with QWidget.grab(). Settings go to a temporary folder, so the pictures
never show someone's recent models or old runs.

    .venv/bin/python scripts/screenshots.py                 # demo model, ~15 min on 2 CPU cores
    .venv/bin/python scripts/screenshots.py --model tiny    # seconds, for checking the layout
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from bench.app_driver import AppDriver  # noqa: E402  (after the path and environment above)

PAGES = ("model", "inspect", "quantize", "evaluate", "chat")
CHAT_PROMPT = "In two sentences, why do rivers flood in spring?"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', 'tiny', or a model folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows for sensitivity")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens in the chat")
    parser.add_argument("--size", default="1400x900", help="window size WxH")
    parser.add_argument("--until", choices=PAGES, default=PAGES[-1],
                        help="stop after this page (sensitivity is cached, so re-taking the first pages is quick)")
    return parser.parse_args()


def tiny_model_folder() -> str:
    """A tiny random LLaMA with the demo tokenizer, saved to a temporary folder."""
    from transformers import AutoTokenizer

    from core.models import demo_model_dir
    from tests.conftest import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    build_tiny_model("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(folder)
    return str(folder)


def main() -> int:
    args = parse_args()
    os.environ["SQUEEZE_STUDIO_HOME"] = tempfile.mkdtemp(prefix="studio-screens-")
    args.out.mkdir(parents=True, exist_ok=True)
    spec = tiny_model_folder() if args.model == "tiny" else args.model

    from studio.app import create_window

    app, window = create_window()
    width, height = (int(v) for v in args.size.split("x"))
    window.resize(width, height)
    window.confirm_close = lambda: True  # on a failure, close without asking
    try:
        take_screenshots(AppDriver(app, window), window, spec, args)
    finally:
        window.close()
    return 0


def take_screenshots(drive: Driver, window, spec: str, args: argparse.Namespace) -> None:
    """Visit every page up to ``args.until`` as a person would, saving one picture per page."""
    pages = window.pages
    drive.finish(lambda: window.open_model(spec), "loading the model")
    drive.grab("model", args.out / "model.png")
    if args.until == "model":
        return

    window.show_page("inspect")
    drive.wait(lambda: window.session.stats is not None and not window.runner.busy, 1800, "analysing the weights")
    calibration = pages["quantize"].calibration_form.editors
    calibration["samples"].setValue(args.samples)
    calibration["seqlen"].setValue(args.seqlen)
    drive.finish(pages["inspect"].compute_sensitivity, "computing sensitivity")
    pages["inspect"].select_matrix(next(n for n in window.session.fisher if n.endswith("mlp.down_proj")))
    drive.wait(lambda: pages["inspect"].previewer.latest is not None and not pages["inspect"].previewer.computing,
               60, "previewing")
    drive.grab("inspect", args.out / "inspect.png")
    if args.until == "inspect":
        return

    window.show_page("quantize")
    output = Path(tempfile.mkdtemp(prefix="screens-out-")) / f"{window.session.model.name}-sq4"
    pages["quantize"].output_picker.set_value(str(output))
    drive.finish(pages["quantize"].start, "quantizing")
    drive.grab("quantize", args.out / "quantize.png")
    if args.until == "quantize":
        return

    evaluate = pages["evaluate"]
    evaluate.eval_form.editors["windows"].setValue(args.windows)
    evaluate.eval_form.editors["seqlen"].setValue(args.seqlen)
    window.show_page("evaluate")
    drive.finish(evaluate.start, "evaluating")
    drive.grab("evaluate", args.out / "evaluate.png")
    if args.until == "evaluate":
        return

    chat = pages["chat"]
    chat.select_mode("side")
    chat.settings_form.editors["temperature"].setValue(0.0)
    chat.settings_form.editors["max_new_tokens"].setValue(args.tokens)
    chat.input_edit.setPlainText(CHAT_PROMPT)
    window.show_page("chat")
    drive.finish(chat.send, "chatting")
    drive.grab("chat", args.out / "chat.png")


if __name__ == "__main__":
    sys.exit(main())
