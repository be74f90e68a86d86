"""Chat messages -> prompt token ids, through the model's own chat template."""

from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Render with the chat template (generation prompt appended) and tokenise without extra specials:
    the template already holds every special token the model expects."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_counter(tokenizer):
    """count_tokens(text) for context budgets."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
