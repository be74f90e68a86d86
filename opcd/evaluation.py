"""Held-out evaluation: generate once per test item with a worker group and score with the task;
and the paper's summary of a run, the mean of its best checkpoints."""

from __future__ import annotations

import statistics

from dataclasses import dataclass, field

from opcd.protocol import SamplingParams


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


def evaluate(who: str, group, prompts: list[list[int]], rows: list[dict], task, tokenizer,
             params: SamplingParams, seed: int) -> EvalResult:
    generation = group.gather("generate", prompts, params, seed)
    mask = generation.response_mask
    texts = tokenizer.batch_decode(generation.response_ids.masked_fill(~mask, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    scores = [task.score(text, row) for text, row in zip(texts, rows)]
    samples = [{"prompt": row["content"][-1]["content"], "response": text, "score": score}
               for row, text, score in zip(rows, texts, scores)]
    return EvalResult(who, sum(scores) / max(len(scores), 1), len(scores), float(mask.sum(-1).float().mean()),
                      samples)


def best_k_mean(scores: dict[int, float], k: int = 3) -> dict:
    """Mean and standard deviation of the k best checkpoint scores (all of them if fewer), with their
    steps; ties prefer the earlier step."""
    if not scores:
        raise ValueError("no checkpoint scores to summarise")
    best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
    values = [score for _, score in best]
    return {"k": len(best), "mean": sum(values) / len(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "steps": [step for step, _ in best]}


def evaluate_games(who: str, group, player, seeds: list[int], params: SamplingParams, seed: int,
                   experience: str | None = None) -> EvalResult:
    """Pass rate over one episode per seed, played by `group` (with `experience` in every prompt when given)."""
    from opcd.games.play import episode_metrics

    episodes = player.play(lambda prompts, p, s: group.gather("generate", prompts, p, s), seeds, params, seed,
                           experience)
    figures = episode_metrics(episodes, params.max_new_tokens)
    extra = {k: figures[k] for k in ("turns_per_episode", "invalid_moves_per_episode", "clipped_turn_rate")}
    return EvalResult(who, figures["pass_rate"], len(episodes), figures["tokens_per_turn"],
                      [e.summary() for e in episodes], extra)
