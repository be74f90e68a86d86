"""Chat messages -> prompt token ids, through the model's own chat template; and the visible part
of a model's answer (its thinking block removed)."""

from __future__ import annotations

import re

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def encode_chat(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Render with the chat template (generation prompt appended) and tokenise without extra specials:
    the template already holds every special token the model expects."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_counter(tokenizer):
    """count_tokens(text) for context budgets."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def strip_thinking(text: str) -> str:
    """Text after the thinking block; an unclosed <think> means the model never finished thinking."""
    text = THINK_BLOCK.sub("", text)
    opened = text.lower().find("<think>")
    return text if opened < 0 else text[:opened]
