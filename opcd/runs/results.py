"""Held-out evaluation results (a domain's `evaluate`, opcd/domains/__init__.py, produces them) and the paper's
summary of a run, the mean of its best checkpoints."""

from __future__ import annotations

import statistics

from dataclasses import dataclass, field


@dataclass
class EvalResult:
    who: str  # e.g. "student_before", "teacher_with_context"
    score: float  # mean task metric
    num_items: int
    mean_response_tokens: float
    samples: list[dict] = field(default_factory=list)  # {"prompt", "response", "score"} per item (games: episodes)
    extra: dict = field(default_factory=dict)  # task-specific figures (games: moves, invalid moves per episode)

    def summary(self) -> dict:
        return {"who": self.who, "score": self.score, "num_items": self.num_items,
                "mean_response_tokens": self.mean_response_tokens, **self.extra}


def best_k_mean(scores: dict[int, float], k: int = 3) -> dict:
    """Mean and standard deviation of the k best checkpoint scores (all of them if fewer), with their
    steps; ties prefer the earlier step."""
    if not scores:
        raise ValueError("no checkpoint scores to summarise")
    best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
    values = [score for _, score in best]
    return {"k": len(best), "mean": sum(values) / len(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "steps": [step for step, _ in best]}
