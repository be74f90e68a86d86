"""Golden tests of opcd.data.prompts with the REAL SmolLM2 tokenizer: the exact ChatML the student and the
teacher see, and the token ids they are given; and the thinking block removed from an answer."""

from opcd.data.contexts import ContextSource, with_system_prompt
from opcd.data.prompts import encode_chat, strip_thinking, token_counter

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France?"
FRENCH = "Always answer in French, whatever the language of the question."


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_user_message_renders_chatml_with_the_default_system_turn(smollm2_tokenizer):
    ids = encode_chat(smollm2_tokenizer, [{"role": "user", "content": QUESTION}])
    expected = _turn("system", DEFAULT_SYSTEM) + _turn("user", QUESTION) + "<|im_start|>assistant\n"
    assert smollm2_tokenizer.decode(ids) == expected


def test_special_tokens_are_single_ids_and_nothing_is_added(smollm2_tokenizer):
    """The template already holds every special token: tokenising it must not add a BOS, and
    `<|im_start|>`/`<|im_end|>` must be their own ids rather than spelled out in pieces."""
    tok = smollm2_tokenizer
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode_chat(tok, [{"role": "user", "content": QUESTION}])
    assert ids[0] == im_start
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids[len(ids) - ids[::-1].index(im_start) - 1:] == \
        [im_start, *tok("assistant\n", add_special_tokens=False)["input_ids"]]  # ends with the generation prompt
    assert im_end == tok.eos_token_id


def test_multi_turn_conversation(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name  a\n\ncolour."}]
    expected = (_turn("system", DEFAULT_SYSTEM) + _turn("user", "Hi") + _turn("assistant", "Hello!")
                + _turn("user", "Name  a\n\ncolour.") + "<|im_start|>assistant\n")
    assert smollm2_tokenizer.decode(encode_chat(smollm2_tokenizer, messages)) == expected


def test_teacher_prompt_replaces_the_default_system_message(smollm2_tokenizer):
    """The context goes INTO the system turn: the teacher must not also see SmolLM2's default one."""
    tok = smollm2_tokenizer
    student = encode_chat(tok, [{"role": "user", "content": QUESTION}])
    teacher = encode_chat(tok, with_system_prompt([{"role": "user", "content": QUESTION}], FRENCH))
    assert tok.decode(teacher) == _turn("system", FRENCH) + _turn("user", QUESTION) + "<|im_start|>assistant\n"
    assert DEFAULT_SYSTEM not in tok.decode(teacher)
    # everything after the system turn is the same ids on both sides
    im_end = tok.eos_token_id
    student_rest = student[student.index(im_end):]
    teacher_rest = teacher[teacher.index(im_end):]
    assert student_rest == teacher_rest


def test_existing_system_message_is_merged_into_one_system_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    text = tok.decode(encode_chat(tok, with_system_prompt(messages, FRENCH)))
    assert text == _turn("system", f"{FRENCH}\n\nBe brief.") + _turn("user", QUESTION) + "<|im_start|>assistant\n"
    assert text.count("<|im_start|>system") == 1


def test_context_source_builds_the_same_teacher_prompt(smollm2_tokenizer):
    source = ContextSource(kind="system_prompt", texts=(FRENCH,))
    messages = [{"role": "user", "content": QUESTION}]
    assert encode_chat(smollm2_tokenizer, source.teacher_messages(messages, index=3, seed=0)) == \
        encode_chat(smollm2_tokenizer, with_system_prompt(messages, FRENCH))


def test_token_counter_counts_without_specials(smollm2_tokenizer):
    count = token_counter(smollm2_tokenizer)
    assert count("") == 0
    assert count("<|im_end|>") == 1
    assert count(FRENCH) == len(smollm2_tokenizer(FRENCH, add_special_tokens=False)["input_ids"])
    assert count(FRENCH + " " + FRENCH) > count(FRENCH)


def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think>visible") == "visible"
    assert strip_thinking("start <think>never closed") == "start "
