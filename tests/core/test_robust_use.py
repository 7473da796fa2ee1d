"""Robustness of evaluation and chat: windows longer than the context, too-long chat messages,
greedy chat without a hidden repetition penalty (issue 18, items 4, 5, 12)."""

from __future__ import annotations

import io
import sys

import pytest
import transformers as tf

from core.config import ChatConfig
from core.data import check_window_fits, model_context_length
from core.errors import UserError
from tests.core.test_cli import one_line_error, run_cli, text_file, tiny_folder  # noqa: F401  (fixtures)

# ---------------------------------------------------------------- windows vs the model's context


def test_model_context_length_reads_the_usual_names():
    assert model_context_length(tf.LlamaConfig(max_position_embeddings=8192)) == 8192
    assert model_context_length(tf.GPT2Config(n_positions=1024)) == 1024
    assert model_context_length({"max_position_embeddings": 4096}) == 4096
    assert model_context_length({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert model_context_length({"hidden_size": 64}) is None and model_context_length(None) is None


def test_window_longer_than_the_context_is_refused():
    config = tf.LlamaConfig(max_position_embeddings=8192)
    with pytest.raises(UserError, match=r"9000 tokens are longer than the model's context of 8192.*--seqlen 8192"):
        check_window_fits(config, 9000)
    check_window_fits(config, 8192)  # the whole context is fine
    check_window_fits({"hidden_size": 64}, 100_000)  # a config that states no context lets it through


def test_eval_seqlen_above_the_context_is_one_line_before_any_work(capsys, tiny_folder, text_file):  # noqa: F811
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--text", text_file, "--windows", "1", "--seqlen", "600")
    assert code == 2
    assert "longer than the model's context of 512" in one_line_error(err)


def test_quantize_seqlen_above_the_context_is_one_line(capsys, tmp_path, tiny_folder, text_file):  # noqa: F811
    code, _, err = run_cli(capsys, "quantize", tiny_folder, "--calibration", text_file, "--samples", "1",
                           "--seqlen", "600", "--output", tmp_path / "out")
    assert code == 2 and "longer than the model's context of 512" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_perplexity_checks_the_window_against_the_model():
    import torch

    from core.evaluate import perplexity
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama")  # context 512
    with pytest.raises(UserError, match="context of 512"):
        next(perplexity(model, torch.zeros(1, 513, dtype=torch.long)))


# ---------------------------------------------------------------- chat: a message too long for the context


def test_chat_goes_on_after_a_message_longer_than_the_context(capsys, monkeypatch, tiny_folder):  # noqa: F811
    long_message = "word " * 700  # the tiny model's context is 512 tokens
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_message}\nhello there\n/quit\n"))
    code, out, err = run_cli(capsys, "chat", tiny_folder, "--temperature", "0", "--max-new-tokens", "3")
    assert code == 0, err
    assert "the model's context is 512" in err and "shorter message" in err and "Traceback" not in err
    assert err.count("tokens/s") == 1  # the next line was read and answered


def test_too_long_message_advice_depends_on_the_history(demo_tokenizer):
    from core.chat import ChatSession, stream_reply
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama")
    session = ChatSession()
    with pytest.raises(UserError, match="this message is .* send a shorter message"):
        next(stream_reply(model, demo_tokenizer, session, "word " * 700, ChatConfig(temperature=0)))
    assert session.history == []  # a refused message leaves the conversation as it was
    session.history = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok " * 100}]
    with pytest.raises(UserError, match=r"conversation is .*\(/reset\)"):
        next(stream_reply(model, demo_tokenizer, session, "word " * 200, ChatConfig(temperature=0)))


# ---------------------------------------------------------------- greedy means greedy


def test_default_repetition_penalty_is_off_everywhere(capsys):
    from core.cli import build_parser

    assert ChatConfig().repetition_penalty == 1.0
    args = build_parser().parse_args(["chat", "demo"])
    assert args.repetition_penalty == 1.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for stated in ("(default 0.7)", "(default 0.9)", "(default 256)", "(default 1.0)", "(default: none)"):
        assert stated in help_text


@pytest.mark.demo
def test_greedy_chat_on_the_demo_model_answers_paris():
    from core.chat import ChatSession, stream_reply
    from core.models import load_model

    loaded = load_model("demo")
    config = ChatConfig(temperature=0.0, max_new_tokens=16)  # every other setting at its default
    gen = stream_reply(loaded.model, loaded.tokenizer, ChatSession(),
                       "What is the capital of France? Answer in one word.", config)
    answer = "".join(gen)
    assert "Paris" in answer, answer
