"""Tasks: how the student sees a dataset row and how one response is scored.

A task is a small object with a `name`, `student_messages(row)` (the messages
the student sees, without the teacher's context) and `score(response, row)`
(a task metric in [0, 1]). `get_task` maps a config name (and the language task's target
language) to a task.
"""

from typing import Protocol

from opcd.errors import ConfigError, DataError
from opcd.tasks.language import LanguageTask, language_name
from opcd.tasks.math import MathTask
from opcd.tasks.sysprompt import MedMCQATask, SafetyTask


class Task(Protocol):
    name: str

    def student_messages(self, row: dict) -> list[dict]:
        """Messages the student sees (no context): a copy of row["content"]."""
        ...

    def score(self, response: str, row: dict) -> float:
        """Task metric for one response, in [0, 1] (accuracy-like)."""
        ...

    def answer_format_error(self, answer: str | None) -> str | None:
        """None when `answer` is a ground truth this task can score, else what it expects instead."""
        ...


TASKS: dict[str, Task] = {
    "medmcqa": MedMCQATask(),
    "safety": SafetyTask(),
    "language": LanguageTask(),
    "math": MathTask(),
}


def get_task(name: str, language: str = "fr") -> Task:
    """The task registered under `name`; the language task answers in `language` (task.language)."""
    if name == "language":
        return LanguageTask(language)
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown task {name!r}; expected one of: {', '.join(sorted(TASKS))}")
    return task


def context_placeholders(language: str) -> dict[str, str]:
    """What a system prompt file's placeholders become: `{language}` -> e.g. "French" for task.language=fr."""
    return {"language": language_name(language)}


def check_answer(task: Task, row: dict, where: str) -> None:
    """Refuse, before any model loads, a row whose `answer` the task cannot score (e.g. MedMCQA rows
    under task=language would only fail at the first evaluation, after training started)."""
    expected = task.answer_format_error(row.get("answer"))
    if expected is not None:
        raise DataError(f"{where}: field 'answer'={row.get('answer')!r} does not fit task={task.name}: "
                        f"expected {expected}")


__all__ = ["check_answer", "Task", "TASKS", "get_task", "context_placeholders", "LanguageTask", "MathTask", "MedMCQATask", "SafetyTask"]
