"""Streaming chat on tiny models with the demo tokenizer: pieces, stop, history, template, eos."""

from __future__ import annotations

import pytest
import torch

from core.chat import ChatSession, _IncrementalDecoder, end_token_ids, prompt_ids, stream_reply
from core.config import ChatConfig
from core.errors import UserError
from tests.conftest import build_tiny_model

GREEDY = ChatConfig(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)


def drive(gen):
    """(pieces, stats) of a stream_reply generator."""
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return pieces, stop.value


def record_calls(model):
    """Wrap model.forward; returns the list of input_ids of every call."""
    original, calls = model.forward, []

    def forward(*args, input_ids=None, **kwargs):
        calls.append(input_ids.detach().clone())
        return original(*args, input_ids=input_ids, **kwargs)

    model.forward = forward
    return calls


def force_token_after(model, token_id: int, n: int):
    """After n forward calls every further call predicts ``token_id``."""
    original, count = model.forward, [0]

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        count[0] += 1
        if count[0] > n:
            out.logits[..., token_id] = 1e4
        return out

    model.forward = forward


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=0)


def test_pieces_concatenate_to_the_reply(model, demo_tokenizer):
    session = ChatSession()
    calls = record_calls(model)
    try:
        pieces, stats = drive(stream_reply(model, demo_tokenizer, session, "Hello there", GREEDY))
    finally:
        del model.forward
    assert stats.tokens == 12 and stats.finish_reason == "length" and not stats.stopped
    assert all(isinstance(p, str) and p for p in pieces)
    reply = session.history[-1]["content"]
    assert "".join(pieces) == reply
    assert len(calls) == 12
    assert all(c.shape == (1, 1) for c in calls[1:])  # KV cache: one new token per step
    assert stats.tokens_per_second > 0 and stats.prompt_tokens == calls[0].shape[1]


def test_greedy_is_deterministic_and_matches_hf_generate(model, demo_tokenizer):
    first, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", GREEDY))
    second, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", GREEDY))
    assert first == second
    ids = prompt_ids(demo_tokenizer, ChatSession().messages("Hi"))
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=sorted(end_token_ids(model, demo_tokenizer)),
                              pad_token_id=0)[0, len(ids):]
    decoded = demo_tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(first) == decoded


def test_sampling_is_reproducible_with_a_seed(model, demo_tokenizer):
    config = ChatConfig(temperature=1.0, top_p=0.9, max_new_tokens=10)
    a, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", config, seed=7))
    b, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", config, seed=7))
    c, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", config, seed=8))
    assert a == b and a != c


def test_stop_is_honoured_within_one_token(model, demo_tokenizer):
    session = ChatSession()
    calls = record_calls(model)
    try:
        config = ChatConfig(temperature=0.0, max_new_tokens=50)
        pieces, stats = drive(stream_reply(model, demo_tokenizer, session, "Go", config,
                                           stop=lambda: len(calls) >= 3))
    finally:
        del model.forward
    assert len(calls) == 3  # no forward pass after stop() said yes
    assert stats.stopped and stats.finish_reason == "stopped" and stats.tokens == 3
    assert session.history[-1] == {"role": "assistant", "content": "".join(pieces)}


def test_history_and_template_across_two_turns(model, demo_tokenizer):
    session = ChatSession()
    session.set_system("You are terse.")
    drive(stream_reply(model, demo_tokenizer, session, "First question", GREEDY))
    first_reply = session.history[1]["content"]
    calls = record_calls(model)
    try:
        drive(stream_reply(model, demo_tokenizer, session, "Second question", GREEDY))
    finally:
        del model.forward
    prompt = demo_tokenizer.decode(calls[0][0])
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert "<|im_start|>user\nFirst question<|im_end|>\n" in prompt
    assert f"<|im_start|>assistant\n{first_reply}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>user\nSecond question<|im_end|>\n<|im_start|>assistant\n")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.history == [] and session.system_prompt == "You are terse."


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>"])
def test_stops_on_end_tokens(demo_tokenizer, end):
    model = build_tiny_model("llama", seed=1)
    end_id = demo_tokenizer.convert_tokens_to_ids(end)
    force_token_after(model, end_id, 4)
    session = ChatSession()
    pieces, stats = drive(stream_reply(model, demo_tokenizer, session, "Hi",
                                       ChatConfig(temperature=0.0, max_new_tokens=50)))
    assert stats.finish_reason == "eos" and stats.tokens == 4 and not stats.stopped
    assert end not in session.history[-1]["content"]


def test_end_tokens_include_generation_config_list(demo_tokenizer):
    model = build_tiny_model("llama")
    model.generation_config.eos_token_id = [5, 7]
    ends = end_token_ids(model, demo_tokenizer)
    assert {5, 7, demo_tokenizer.eos_token_id, demo_tokenizer.convert_tokens_to_ids("<|endoftext|>")} <= ends


def test_repetition_penalty_changes_greedy_choice(demo_tokenizer):
    model = build_tiny_model("llama", seed=2)
    plain, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi", GREEDY))
    penalised, _ = drive(stream_reply(model, demo_tokenizer, ChatSession(), "Hi",
                                      ChatConfig(temperature=0.0, max_new_tokens=12, repetition_penalty=2.0)))
    assert plain != penalised


def test_incremental_decoder_handles_multibyte_characters(demo_tokenizer):
    text = "naïve café — 日本語 🙂 done"
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = _IncrementalDecoder(demo_tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_too_long_conversation_is_a_user_error(model, demo_tokenizer):
    # /reset cannot help a message that alone overflows the context: the advice is a shorter message
    with pytest.raises(UserError, match="send a shorter message"):
        drive(stream_reply(model, demo_tokenizer, ChatSession(), "word " * 600, GREEDY))


def test_closing_the_generator_keeps_what_was_shown(model, demo_tokenizer):
    session = ChatSession()
    gen = stream_reply(model, demo_tokenizer, session, "Hi", ChatConfig(temperature=0.0, max_new_tokens=30))
    shown = next(gen)
    gen.close()
    assert session.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": shown}]


def test_top_p_keeps_the_smallest_set_reaching_p():
    from core.chat import _Sampler

    probs = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05])
    logits = probs.log()

    def draws(top_p: float) -> set[int]:
        config = ChatConfig(temperature=1.0, top_p=top_p, repetition_penalty=1.0)
        sampler = _Sampler(config, [], torch.device("cpu"), seed=0)
        return {sampler(logits) for _ in range(300)}

    assert draws(0.4) == {1}
    assert draws(0.7) == {1, 2}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert draws(1.0) == {0, 1, 2, 3, 4}
