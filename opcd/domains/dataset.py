"""A dataset domain: the rows of a task (opcd/tasks/), tokenised for training and evaluation, raw for
extraction."""

from __future__ import annotations

from dataclasses import dataclass, field

from opcd.data.contexts import with_experience
from opcd.data.experience import writer_prompt
from opcd.data.prompts import encode_chat
from opcd.data.rows import shuffled_order
from opcd.domains import decode_responses
from opcd.domains.sources import PromptSource
from opcd.protocol import Example, SamplingParams
from opcd.runs.results import EvalResult
from opcd.tasks import Task


@dataclass
class DatasetDomain:
    """A task's rows. Training and evaluation use the tokenised examples (prompts over
    task.max_prompt_length dropped); extraction uses the rows themselves, its experience placed in
    the prompt. A pipeline fills only the lists it needs."""

    task: Task
    tokenizer: object
    enable_thinking: bool | None
    seed: int
    batch_size: int
    samples_per_prompt: int
    train_examples: list[Example] = field(default_factory=list)
    eval_examples: list[Example] = field(default_factory=list)
    train_rows: list[dict] = field(default_factory=list)  # extraction stream
    eval_rows: list[dict] = field(default_factory=list)  # extraction held-out set
    settings: dict = field(default_factory=dict)

    @property
    def num_eval_items(self) -> int:
        return len(self.eval_examples)

    def training_source(self) -> PromptSource:
        return PromptSource(self.train_examples, self.batch_size, self.samples_per_prompt, self.seed, self.task,
                            self.tokenizer)

    def rollout_length(self, max_prompt_length: int, max_response_length: int) -> int:
        return max_prompt_length + max_response_length

    def evaluate(self, who: str, group, side: str, params: SamplingParams, seed: int) -> EvalResult:
        """One generation per test row, scored by the task."""
        examples = self.eval_examples
        prompts = [e.student_prompt if side == "student" else e.teacher_prompt for e in examples]
        rows = [e.row for e in examples]
        generation = group.generate(prompts, params, seed)
        texts = decode_responses(self.tokenizer, generation)
        scores = [self.task.score(text, row) for text, row in zip(texts, rows)]
        samples = [{"prompt": row["content"][-1]["content"], "response": text, "score": score}
                   for row, text, score in zip(rows, texts, scores)]
        return EvalResult(who, sum(scores) / max(len(scores), 1), len(scores),
                          float(generation.response_mask.sum(-1).float().mean()), samples)

    def _prompt(self, row: dict, experience: str) -> list[int]:
        messages = self.task.student_messages(row)
        return encode_chat(self.tokenizer, with_experience(messages, experience) if experience else messages,
                           self.enable_thinking)

    def _solve(self, group, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[str]:
        return decode_responses(self.tokenizer, group.generate(prompts, params, seed))

    def extraction_stream(self, seed: int, count: int) -> list[dict]:
        order = shuffled_order(len(self.train_rows), seed, 0)[:count]
        return [self.train_rows[i] for i in order]

    def extraction_heldout(self, group, experience: str, params: SamplingParams, seed: int) -> dict:
        texts = self._solve(group, [self._prompt(row, experience) for row in self.eval_rows], params, seed)
        return {"score": sum(self.task.score(t, r) for t, r in zip(texts, self.eval_rows)) / len(self.eval_rows)}

    def extraction_attempt(self, group, row: dict, params: SamplingParams, seed: int, previous: str | None,
                           max_items: int) -> tuple[dict, str]:
        (attempt,) = self._solve(group, [self._prompt(row, "")], params, seed)
        correct = self.task.score(attempt, row)
        prompt = writer_prompt(row["content"][-1]["content"], attempt, correct >= 1.0, str(row["answer"]), previous,
                               max_items)
        return {"problem_id": row.get("id"), "attempt": attempt, "score": correct}, prompt


