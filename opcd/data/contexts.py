"""The teacher's context: a system prompt or a file of experience, and how it is added to a row.

The student answers a row's messages as they are; the teacher scores the same
answer with a context added. Two kinds of context are supported:

* ``system_prompt``: prepended as (or merged into) the leading system message;
* ``experience``: a file of lessons learned from earlier attempts, wrapped
  around the last user turn with `EXPERIENCE_TEMPLATE`.

Experience file format: every item starts on a line that begins with
`ITEM_MARKER` ("[exp]", at column 0); the lines after it, up to the next
marker, belong to the same item. Text before the first marker is a preamble.
Items are ordered oldest first, so truncation keeps the LAST items.

All functions are pure and return new message lists; none mutates its input.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from opcd.errors import ConfigError, ContextError
from opcd.data.files import read_text

ContextKind = Literal["system_prompt", "experience"]
CONTEXT_KINDS: tuple[str, ...] = ("system_prompt", "experience")

# Distinctive on purpose: ordinary bullets ("- ", "* ") inside an item's text
# must not start a new item, and an indented "[exp]" stays part of its item.
ITEM_MARKER = "[exp]"

EXPERIENCE_TEMPLATE = (
    "Below are lessons gathered from earlier attempts at problems like this one:\n\n"
    "{experience}\n\n"
    "Apply the lessons that are relevant and ignore the rest. Now work on the following problem.\n\n"
    "{problem}"
)


def read_context_file(path: str | Path) -> str:
    """Stripped text of a system-prompt or experience file."""
    file = Path(path)
    if not file.is_file():
        raise ContextError(f"context file not found: {path} (expected a system-prompt or experience text file)")
    text = read_text(file, ContextError).strip()
    if not text:
        raise ContextError(f"context file is empty: {path}")
    return text


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """A new message list whose leading system message carries `system_prompt`.

    If the conversation has no leading system message, one is inserted first.
    If it already starts with one, the two are MERGED into a single system
    message, `system_prompt + "\\n\\n" + existing content`: many chat templates
    accept only one leading system message, so adding a second would either
    raise or silently drop one of them.
    """
    copied = [dict(message) for message in messages]
    if copied and copied[0].get("role") == "system":
        merged = {**copied[0], "content": f"{system_prompt}\n\n{copied[0]['content']}"}
        return [merged, *copied[1:]]
    return [{"role": "system", "content": system_prompt}, *copied]


def split_preamble(text: str) -> tuple[str, list[str]]:
    """(preamble, items) of an experience text; see the module docstring for the format."""
    preamble: list[str] = []
    items: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(ITEM_MARKER):
            items.append([line])
        elif items:
            items[-1].append(line)
        else:
            preamble.append(line)
    return "\n".join(preamble).strip(), ["\n".join(item).rstrip() for item in items]


def split_items(text: str) -> list[str]:
    """Experience items in file order, each with its continuation lines; the preamble is dropped."""
    return split_preamble(text)[1]


def join_items(items: list[str]) -> str:
    """Experience text made of `items`, one after another (inverse of `split_items`)."""
    return "\n".join(items)


def truncate_experience(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """`text` cut down to its newest whole items that fit in `max_tokens` tokens.

    Text that already fits is returned unchanged (preamble included). Otherwise
    the preamble is dropped and the last items are kept, as many as fit once
    joined. Text without any marker counts as a single item. `max_tokens <= 0`
    means no limit.
    """
    if max_tokens <= 0 or count_tokens(text) <= max_tokens:
        return text
    items = split_items(text) or [text.strip()]
    kept = 0
    while kept < len(items) and count_tokens(join_items(items[-(kept + 1):])) <= max_tokens:
        kept += 1
    if kept == 0:
        newest = count_tokens(items[-1])
        raise ContextError(
            f"experience budget of {max_tokens} tokens is smaller than its newest item ({newest} tokens)"
        )
    return join_items(items[-kept:])


def with_experience(messages: list[dict], experience: str) -> list[dict]:
    """A new message list whose last user turn is wrapped in `EXPERIENCE_TEMPLATE`."""
    copied = [dict(message) for message in messages]
    user_turns = [i for i, message in enumerate(copied) if message.get("role") == "user"]
    if not user_turns:
        raise ContextError("cannot add experience: the conversation has no user message")
    last = user_turns[-1]
    problem = copied[last]["content"]
    copied[last]["content"] = EXPERIENCE_TEMPLATE.format(experience=experience, problem=problem)
    return copied


def pick_index(count: int, seed: int, index: int) -> int:
    """Deterministic choice in range(count) for example `index` under `seed`."""
    if count == 1:
        return 0
    # numpy seeds must be non-negative; say so in our words rather than numpy's.
    if seed < 0 or index < 0:
        raise ConfigError(f"context pick needs a non-negative seed and example index, got seed={seed}, index={index}")
    return int(np.random.default_rng((seed, index)).integers(count))


@dataclass(frozen=True)
class ContextSource:
    """The teacher's context: one or more texts of one kind, one picked per example."""

    kind: ContextKind
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ConfigError(f"context kind must be one of {', '.join(CONTEXT_KINDS)}, got {self.kind!r}")
        if not self.texts:
            raise ContextError(f"a {self.kind} context needs at least one text, got none")

    def text_for(self, index: int, seed: int) -> str:
        """The context text for example `index` (the same pick for the same seed and index)."""
        return self.texts[pick_index(len(self.texts), seed, index)]

    def teacher_messages(self, messages: list[dict], index: int, seed: int) -> list[dict]:
        """`messages` with the context for example `index` added (same pick for the same seed and index)."""
        text = self.text_for(index, seed)
        if self.kind == "system_prompt":
            return with_system_prompt(messages, text)
        return with_experience(messages, text)


def context_paths(path: str | Path) -> list[Path]:
    """The context files named by `path`: itself, or for a `.list` file the paths it holds.

    A `.list` file has one path per line, relative to the list file's folder;
    blank lines and lines starting with "#" are skipped.
    """
    file = Path(path)
    if file.suffix != ".list":
        return [file]
    if not file.is_file():
        raise ContextError(f"context list file not found: {path} (expected one context file path per line)")
    lines = [line.strip() for line in read_text(file, ContextError).splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise ContextError(f"context list file names no files: {path}")
    return [file.parent / name for name in names]


def load_context(kind: str, path: str, max_tokens: int, count_tokens: Callable[[str], int],
                 placeholders: dict[str, str] | None = None) -> ContextSource:
    """Read the context file(s) at `path` and check or truncate them against `max_tokens`.

    Experience texts are truncated to their newest items (`truncate_experience`);
    a system prompt over the budget is an error, since cutting it would change
    its meaning. `max_tokens <= 0` disables both. In a system prompt, each
    `{name}` of `placeholders` is replaced by its value (`{language}`: the
    language task's target); experience text is left as written.
    """
    if kind not in CONTEXT_KINDS:
        raise ConfigError(f"context kind must be one of {', '.join(CONTEXT_KINDS)}, got {kind!r}")
    texts = []
    for file in context_paths(path):
        text = read_context_file(file)
        if kind == "experience":
            try:
                text = truncate_experience(text, count_tokens, max_tokens)
            except ContextError as error:
                raise ContextError(f"{file}: {error}") from None
        else:
            for name, value in (placeholders or {}).items():
                text = text.replace("{" + name + "}", value)
        if kind == "system_prompt" and max_tokens > 0 and (tokens := count_tokens(text)) > max_tokens:
            raise ContextError(f"system prompt {file} has {tokens} tokens, over experience_max_length={max_tokens}")
        texts.append(text)
    return ContextSource(kind=kind, texts=tuple(texts))  # type: ignore[arg-type]
