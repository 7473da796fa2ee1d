"""``squeeze eval`` and ``squeeze chat``: judge a quantized model and talk to it."""

from __future__ import annotations

import argparse
import sys

from core.cli import drive


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL_OR_DIR",
                   help="demo, an HF folder, a .gguf file, a hub name or a quantized folder")
    p.add_argument("--compare", action="store_true",
                   help="evaluate all given models on identical windows and print one table "
                        "(the first is the reference, usually the original)")
    p.add_argument("--text", default="builtin", metavar="SOURCE",
                   help="builtin, a UTF-8 text file, or a datasets name (wikitext2, c4, hf:NAME)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")


def run_eval(args: argparse.Namespace) -> int:
    from core.config import EvalConfig
    from core.evaluate import compare, format_compare_table

    config = EvalConfig(source=args.text, windows=args.windows, seqlen=args.seqlen, batch_size=args.batch_size)
    rows = drive(compare(args.models, config), args.quiet)
    if args.compare or len(rows) > 1:
        print(format_compare_table(rows))
    else:
        r = rows[0]
        print(f"{r.name}: perplexity {r.perplexity:.3f} on {config.windows} x {config.seqlen} tokens "
              f"({r.bits_per_weight:.2f} bits per weight, {r.tokens_per_second:.0f} tokens/s)")
    return 0


def configure_chat(p: argparse.ArgumentParser) -> None:
    from core.config import ChatConfig

    d = ChatConfig()
    p.add_argument("model", metavar="MODEL_OR_DIR", help="demo, an HF folder, a .gguf file or a quantized folder")
    p.add_argument("--system", default=d.system_prompt,
                   help="system prompt (default: %s)" % (repr(d.system_prompt) if d.system_prompt else "none"))
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="0 is greedy: always the most likely token (default %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest answer (default %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="1 is off, above 1 discourages repeats (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")


CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /quit; Ctrl-C stops an answer"


def run_chat(args: argparse.Namespace) -> int:
    from core.chat import ChatSession
    from core.config import ChatConfig
    from core.errors import UserError
    from core.models import load_model

    config = ChatConfig(system_prompt=args.system, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    loaded = load_model(args.model)
    session = ChatSession(system_prompt=config.system_prompt)
    interactive = sys.stdin.isatty()
    print(f"chatting with {loaded.name}; {CHAT_HELP}", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            session.set_system(text[len("/system"):])
            print(f"(system prompt: {session.system_prompt!r})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        try:
            _answer(loaded, session, text, config, args.seed)
        except UserError as exc:
            # A problem with this one message (too long for the context...): say so and read the next
            # line; the session and its history stay as they were.
            print(f"squeeze: {exc}", file=sys.stderr)


def _answer(loaded, session, text: str, config, seed: int | None) -> None:
    """Stream one answer; Ctrl-C ends the answer, not the session."""
    from core.chat import stream_reply

    gen = stream_reply(loaded.model, loaded.tokenizer, session, text, config, seed=seed)
    try:
        while True:
            try:
                piece = next(gen)
            except StopIteration as done:
                stats = done.value
                break
            print(piece, end="", flush=True)
        print()
        print(f"({stats.tokens} tokens, {stats.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    except KeyboardInterrupt:
        gen.close()  # keeps what was said so far in the history
        print("\n(stopped)", file=sys.stderr)
