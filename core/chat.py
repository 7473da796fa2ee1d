"""Streaming chat: a generator of text pieces over a token loop we control.

The loop runs the model's forward one token at a time with its KV cache, so a stop
request is honoured before the next token and the pieces reach the caller as soon as
they are stable text (a multi-byte character split over tokens is held back until it
is complete).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from core.config import ChatConfig
from core.errors import UserError

# End-of-turn markers of common chat formats. Some tokenizers report a different eos than the
# one their chat template ends a turn with (ASSETS.md), so every one present in the vocab stops.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>", "<|end_of_text|>")


@dataclass
class ChatSession:
    """A conversation: the system prompt and the turns so far.

    history: [{"role": "user" | "assistant", "content": str}, ...] in order.
    """

    system_prompt: str = ""
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt."""
        self.history.clear()

    def set_system(self, text: str) -> None:
        self.system_prompt = text.strip()

    def messages(self, user_text: str) -> list[dict[str, str]]:
        """The messages the model sees for the next reply."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + list(self.history) + [{"role": "user", "content": user_text}]


@dataclass(frozen=True)
class ChatStats:
    """tokens: generated tokens (end token excluded); seconds: wall time from the prompt to the last
    token; finish_reason: "eos" (the model ended its turn), "length" (max_new_tokens or the model's
    context was reached) or "stopped" (asked to stop)."""

    tokens: int
    seconds: float
    tokens_per_second: float
    stopped: bool
    finish_reason: str
    prompt_tokens: int = 0


def end_token_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a reply: the tokenizer's and generation config's eos, and known
    end-of-turn markers present in the vocab."""
    ids: set[int] = set()
    candidates = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(i) for i in c)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return ids


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation in the tokenizer's chat template, ready for the reply."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        # Base models have no template: a plain transcript still gives them something to continue.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    # The template already holds the special tokens (BOS, turn markers): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _IncrementalDecoder:
    """Turns a growing list of token ids into stable text pieces in O(1) decodes per token.

    Decodes a short window of recent tokens twice (with and without the newest) and emits the
    difference; a trailing U+FFFD means a multi-byte character is incomplete, so it waits.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd") and text.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text still held back (a reply cut inside a multi-byte character ends in U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if text.startswith(prefix) else ""


class _Sampler:
    """Next-token choice: repetition penalty, then greedy (temperature 0) or temperature + top-p."""

    def __init__(self, config: ChatConfig, prompt: list[int], device: torch.device, seed: int | None) -> None:
        self.config = config
        self.prompt = prompt
        self.seen: torch.Tensor | None = None  # bool [vocab], sized by the first logits
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: float [vocab] of the next position -> the chosen token id."""
        if self.seen is None:
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = torch.tensor(self.prompt, dtype=torch.long, device=logits.device)
            self.seen[ids[ids < logits.shape[-1]]] = True
        logits = logits.float()
        penalty = self.config.repetition_penalty
        if penalty != 1.0:  # as in transformers: shrink the logits of every token already in the text
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.config.temperature == 0:
            choice = int(logits.argmax())
        else:
            choice = self._sample(logits / self.config.temperature)
        self.seen[choice] = True
        return choice

    def _sample(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= self.config.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=self.generator)
        return int(order[pick])


@torch.inference_mode()
def _forward(model, ids: torch.Tensor, past, total_len: int):
    """One forward step: ids int64 [1, k] -> (float logits [vocab] of the last position, new cache)."""
    mask = torch.ones(1, total_len, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
    return out.logits[0, -1], out.past_key_values


def _context_limit(model) -> int | None:
    from core.data import model_context_length

    return model_context_length(getattr(model, "config", None))


def _too_long(tokenizer, session: ChatSession, user_text: str, tokens: int, limit: int) -> str:
    """The advice for a prompt of ``tokens`` >= ``limit``: /reset helps only when there is history."""
    if session.history:
        alone = len(prompt_ids(tokenizer, ChatSession(session.system_prompt).messages(user_text)))
        if alone < limit:
            return (f"the conversation is {tokens} tokens, the model's context is {limit}: start a new "
                    "conversation (/reset) or send a shorter message")
    return (f"this message is {tokens} tokens with the system prompt, the model's context is {limit}: "
            "send a shorter message (or a shorter system prompt)")


def stream_reply(model, tokenizer, session: ChatSession, user_text: str, config: ChatConfig,
                 stop: Callable[[], bool] | None = None, *, seed: int | None = None
                 ) -> Generator[str, None, ChatStats]:
    """Generate the assistant's reply to ``user_text``, yielding text pieces as they become stable.

    The concatenation of the pieces is the reply. ``stop()`` is checked before every token. When the
    reply ends (end token, length, stop, or the consumer closing the generator) the user message and
    the reply produced so far are appended to ``session.history``. ``seed`` makes sampling
    reproducible (greedy ignores it).
    """
    ids = prompt_ids(tokenizer, session.messages(user_text))
    limit = _context_limit(model)
    if limit is not None and len(ids) >= limit:
        raise UserError(_too_long(tokenizer, session, user_text, len(ids), limit))
    device = next(model.parameters()).device
    ends = end_token_ids(model, tokenizer)
    sampler = _Sampler(config, ids, device, seed)
    decoder = _IncrementalDecoder(tokenizer)
    max_new = config.max_new_tokens if limit is None else min(config.max_new_tokens, limit - len(ids))
    pieces: list[str] = []
    finish, past, generated = "length", None, 0
    step_input = torch.tensor([ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    try:
        while generated < max_new:
            if stop is not None and stop():
                finish = "stopped"
                break
            logits, past = _forward(model, step_input, past, len(ids) + generated)
            token = sampler(logits)
            if token in ends:
                finish = "eos"
                break
            generated += 1
            step_input = torch.tensor([[token]], dtype=torch.long, device=device)
            piece = decoder.push(token)
            if piece:
                pieces.append(piece)
                yield piece
        rest = decoder.flush()
        if rest:
            pieces.append(rest)
            yield rest
    finally:
        # also when the consumer closes the generator: the session keeps what was shown
        session.history.append({"role": "user", "content": user_text})
        session.history.append({"role": "assistant", "content": "".join(pieces)})
    seconds = time.perf_counter() - t0
    return ChatStats(generated, seconds, generated / max(seconds, 1e-9), finish == "stopped", finish, len(ids))
