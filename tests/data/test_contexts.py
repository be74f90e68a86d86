"""Tests for opcd.data.contexts: teacher prompts, experience truncation and context loading."""

import re
from pathlib import Path

import pytest

from opcd.data.contexts import (
    EXPERIENCE_TEMPLATE,
    ITEM_MARKER,
    ContextSource,
    join_items,
    load_context,
    read_context_file,
    split_items,
    split_preamble,
    truncate_experience,
    with_experience,
    with_system_prompt,
)
from opcd.errors import ConfigError, ContextError

REPO = Path(__file__).resolve().parents[2]


def count_words(text: str) -> int:
    """A whitespace token counter: simple enough to check budgets by hand."""
    return len(text.split())


QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]

EXPERIENCE = """Lessons collected by the solver.

[exp] Check the units before adding quantities.
[exp] When a problem has many cases,
list them first
and then count.
[exp] Re-read the question before giving the final answer."""


# --- read_context_file ------------------------------------------------------


def test_read_context_file_strips(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("\n  Answer in French.  \n\n", encoding="utf-8")
    assert read_context_file(path) == "Answer in French."


def test_read_context_file_missing(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ContextError, match=rf"^context file not found: {re.escape(str(missing))} \(expected a system-prompt or experience text file\)$"):
        read_context_file(missing)


def test_read_context_file_empty(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(ContextError, match=rf"^context file is empty: {re.escape(str(path))}$"):
        read_context_file(path)


def test_shipped_system_prompts_read():
    for name in ("medmcqa", "safety", "french"):
        assert read_context_file(REPO / "system_prompts" / f"{name}.txt")
    assert "<answer>" in read_context_file(REPO / "system_prompts" / "medmcqa.txt")
    assert "<answer>yes</answer>" in read_context_file(REPO / "system_prompts" / "safety.txt")
    assert "French" in read_context_file(REPO / "system_prompts" / "french.txt")


# --- with_system_prompt (golden) --------------------------------------------


def test_with_system_prompt_inserts_when_absent():
    messages = [{"role": "user", "content": "Why do cats purr?"}]
    assert with_system_prompt(messages, "Always reply in French.") == [
        {"role": "system", "content": "Always reply in French."},
        {"role": "user", "content": "Why do cats purr?"},
    ]
    assert messages == [{"role": "user", "content": "Why do cats purr?"}]  # input untouched


def test_with_system_prompt_merges_into_existing_system_message():
    messages = [
        {"role": "system", "content": "Keep answers short."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why do cats purr?"},
    ]
    result = with_system_prompt(messages, "Always reply in French.")
    assert result == [
        {"role": "system", "content": "Always reply in French.\n\nKeep answers short."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why do cats purr?"},
    ]
    assert messages[0] == {"role": "system", "content": "Keep answers short."}
    assert result[1] is not messages[1]  # copies, so later edits cannot leak back


# --- with_experience (golden) -----------------------------------------------


def test_with_experience_golden():
    messages = [
        {"role": "system", "content": "You solve maths problems."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    result = with_experience(messages, "[exp] Add carefully.")
    assert result == [
        {"role": "system", "content": "You solve maths problems."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {
            "role": "user",
            "content": (
                "Below are lessons gathered from earlier attempts at problems like this one:\n\n"
                "[exp] Add carefully.\n\n"
                "Apply the lessons that are relevant and ignore the rest. Now work on the following problem.\n\n"
                "What is 2 + 3?"
            ),
        },
    ]
    assert messages[3]["content"] == "What is 2 + 3?"


def test_with_experience_keeps_braces_literal():
    result = with_experience([{"role": "user", "content": "Solve {x}"}], "[exp] Use {braces}")
    assert result[0]["content"] == EXPERIENCE_TEMPLATE.replace("{experience}", "[exp] Use {braces}").replace(
        "{problem}", "Solve {x}"
    )


def test_with_experience_needs_a_user_message():
    with pytest.raises(ContextError, match="no user message"):
        with_experience([{"role": "system", "content": "x"}], "[exp] y")


# --- experience items and truncation ----------------------------------------


def test_split_items_keeps_continuation_lines_and_drops_preamble():
    preamble, items = split_preamble(EXPERIENCE)
    assert preamble == "Lessons collected by the solver."
    assert items == split_items(EXPERIENCE) == [
        "[exp] Check the units before adding quantities.",
        "[exp] When a problem has many cases,\nlist them first\nand then count.",
        "[exp] Re-read the question before giving the final answer.",
    ]
    assert join_items(items) == EXPERIENCE.split("\n\n", 1)[1]


def test_marker_only_counts_at_line_start():
    text = f"{ITEM_MARKER} one\n  {ITEM_MARKER} still one\n- a bullet, still one\n{ITEM_MARKER} two"
    assert split_items(text) == [f"{ITEM_MARKER} one\n  {ITEM_MARKER} still one\n- a bullet, still one", f"{ITEM_MARKER} two"]


def test_truncate_returns_text_unchanged_when_it_fits():
    assert truncate_experience(EXPERIENCE, count_words, 1000) == EXPERIENCE


def test_truncate_disabled_by_non_positive_budget():
    assert truncate_experience(EXPERIENCE, count_words, 0) == EXPERIENCE
    assert truncate_experience(EXPERIENCE, count_words, -1) == EXPERIENCE


def test_truncate_keeps_newest_whole_items():
    # Items have 7, 13 and 9 words; the preamble adds 5.
    assert truncate_experience(EXPERIENCE, count_words, 9) == "[exp] Re-read the question before giving the final answer."
    assert truncate_experience(EXPERIENCE, count_words, 21) == "[exp] Re-read the question before giving the final answer."
    assert truncate_experience(EXPERIENCE, count_words, 22) == (
        "[exp] When a problem has many cases,\nlist them first\nand then count.\n"
        "[exp] Re-read the question before giving the final answer."
    )
    assert truncate_experience(EXPERIENCE, count_words, 30) == join_items(split_items(EXPERIENCE))  # preamble dropped


def test_truncate_errors_when_newest_item_does_not_fit():
    with pytest.raises(ContextError, match=r"^experience budget of 5 tokens is smaller than its newest item \(9 tokens\)$"):
        truncate_experience(EXPERIENCE, count_words, 5)


def test_truncate_text_without_markers_is_one_item():
    assert truncate_experience("just some words", count_words, 3) == "just some words"
    with pytest.raises(ContextError, match=r"budget of 2 tokens is smaller than its newest item \(3 tokens\)"):
        truncate_experience("just some words", count_words, 2)


# --- ContextSource ----------------------------------------------------------


def test_context_source_system_prompt():
    source = ContextSource("system_prompt", ("Reply in French.",))
    assert source.teacher_messages(QUESTION, index=7, seed=0) == [
        {"role": "system", "content": "Reply in French."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]


def test_context_source_experience():
    source = ContextSource("experience", ("[exp] Add carefully.",))
    assert source.teacher_messages(QUESTION, 0, 0) == with_experience(QUESTION, "[exp] Add carefully.")


def test_context_source_picks_are_deterministic_and_use_every_text():
    texts = tuple(f"prompt {i}" for i in range(4))
    source = ContextSource("system_prompt", texts)

    def picks(seed: int) -> list[str]:
        return [source.teacher_messages(QUESTION, index, seed)[0]["content"] for index in range(200)]

    assert picks(0) == picks(0)
    assert picks(0) != picks(1)
    assert set(picks(0)) == set(texts)
    # The pick depends only on (seed, index), not on call order.
    assert source.teacher_messages(QUESTION, 17, 0) == ContextSource("system_prompt", texts).teacher_messages(QUESTION, 17, 0)


def test_context_source_rejects_bad_kind_and_no_texts():
    with pytest.raises(ConfigError, match="context kind must be one of system_prompt, experience, got 'memory'"):
        ContextSource("memory", ("x",))  # type: ignore[arg-type]
    with pytest.raises(ContextError, match="needs at least one text"):
        ContextSource("experience", ())


# --- load_context -----------------------------------------------------------


def test_load_context_single_system_prompt():
    source = load_context("system_prompt", str(REPO / "system_prompts" / "french.txt"), 100, count_words)
    assert source == ContextSource("system_prompt", (read_context_file(REPO / "system_prompts" / "french.txt"),))


def test_load_context_system_prompt_over_budget(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("one two three four five", encoding="utf-8")
    with pytest.raises(ContextError, match=rf"^system prompt {re.escape(str(path))} has 5 tokens, over experience_max_length=4$"):
        load_context("system_prompt", str(path), 4, count_words)
    assert load_context("system_prompt", str(path), 0, count_words).texts == ("one two three four five",)


def test_load_context_list_of_experience_files_truncates_each(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "a.txt").write_text(EXPERIENCE, encoding="utf-8")
    (tmp_path / "exp" / "b.txt").write_text("[exp] Short lesson.\n", encoding="utf-8")
    listing = tmp_path / "all.list"
    listing.write_text("# experience files, oldest run first\nexp/a.txt\n\nexp/b.txt\n", encoding="utf-8")
    source = load_context("experience", str(listing), 9, count_words)
    assert source.kind == "experience"
    assert source.texts == ("[exp] Re-read the question before giving the final answer.", "[exp] Short lesson.")


def test_load_context_names_the_file_whose_item_is_too_long(tmp_path):
    path = tmp_path / "exp.txt"
    path.write_text(EXPERIENCE, encoding="utf-8")
    with pytest.raises(ContextError, match=rf"^{re.escape(str(path))}: experience budget of 3 tokens is smaller than its newest item \(9 tokens\)$"):
        load_context("experience", str(path), 3, count_words)


def test_load_context_list_errors(tmp_path):
    with pytest.raises(ContextError, match="context list file not found"):
        load_context("experience", str(tmp_path / "missing.list"), 0, count_words)
    empty = tmp_path / "empty.list"
    empty.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(ContextError, match=rf"context list file names no files: {re.escape(str(empty))}"):
        load_context("experience", str(empty), 0, count_words)
    broken = tmp_path / "broken.list"
    broken.write_text("gone.txt\n", encoding="utf-8")
    with pytest.raises(ContextError, match=rf"context file not found: {re.escape(str(tmp_path / 'gone.txt'))}"):
        load_context("experience", str(broken), 0, count_words)


def test_load_context_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="got 'prompt'"):
        load_context("prompt", "x.txt", 0, count_words)
