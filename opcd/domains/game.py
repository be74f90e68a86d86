"""A text-game domain: episodes from seeds (opcd/games/), or stored states for OEL's consolidation."""

from __future__ import annotations

from dataclasses import dataclass, field

from opcd.data.contexts import ITEM_MARKER, ContextSource
from opcd.data.seeds import training_seeds
from opcd.domains.sources import GameSource, PromptSource
from opcd.games.play import GamePlayer, episode_metrics
from opcd.games.prompts import writer_prompt as game_writer_prompt
from opcd.protocol import Example, SamplingParams
from opcd.runs.results import EvalResult


@dataclass(kw_only=True)
class GameDomain:
    """A text game: training episodes from the run's seeds (or, for OEL's consolidation, stored
    states answered afresh each step), evaluation on the fixed held-out episodes (pass rate; the
    teacher plays with the first experience file), an extraction item = one new episode."""

    player: GamePlayer
    context: ContextSource
    tokenizer: object
    seed: int
    episodes_per_step: int
    eval_seeds: list[int]
    batch_size: int
    samples_per_prompt: int
    states: list[Example] | None = None  # stored states to train on instead of new episodes
    state_score: object = None  # what a state's answer is scored by (a Task-like `score`)
    settings: dict = field(default_factory=dict)

    @property
    def num_eval_items(self) -> int:
        return len(self.eval_seeds)

    def training_source(self) -> PromptSource | GameSource:
        if self.states is not None:
            return PromptSource(self.states, self.batch_size, self.samples_per_prompt, self.seed, self.state_score,
                                self.tokenizer)
        return GameSource(self.player, self.context, self.episodes_per_step, self.seed)

    def rollout_length(self, max_prompt_length: int, max_response_length: int) -> int:
        if self.player.mode == "trajectory":  # every move and the environment's answer in one sequence
            return max_prompt_length + self.player.max_steps * (max_response_length + 256)
        return max_prompt_length + max_response_length

    def _play(self, group, seeds: list[int], params: SamplingParams, seed: int, experience: str | None):
        return self.player.play(group.generate, seeds, params, seed, experience)

    def _score(self, who: str, group, params: SamplingParams, seed: int, experience: str | None) -> EvalResult:
        """Pass rate over one held-out episode per seed (with `experience` in every prompt when given)."""
        episodes = self._play(group, self.eval_seeds, params, seed, experience)
        figures = episode_metrics(episodes, params.max_new_tokens)
        extra = {k: figures[k] for k in ("turns_per_episode", "invalid_moves_per_episode", "clipped_turn_rate")}
        return EvalResult(who, figures["pass_rate"], len(episodes), figures["tokens_per_turn"],
                          [e.summary() for e in episodes], extra)

    def evaluate(self, who: str, group, side: str, params: SamplingParams, seed: int) -> EvalResult:
        return self._score(who, group, params, seed, self.context.texts[0] if side == "teacher" else None)

    def extraction_stream(self, seed: int, count: int) -> list[int]:
        return [training_seeds(seed, item + 1, 1)[0] for item in range(count)]

    def extraction_heldout(self, group, experience: str, params: SamplingParams, seed: int) -> dict:
        result = self._score("heldout", group, params, seed, experience or None)
        return {"score": result.score, "turns_per_episode": result.extra["turns_per_episode"],
                "tokens_per_turn": result.mean_response_tokens,
                "invalid_moves_per_episode": result.extra["invalid_moves_per_episode"]}

    def extraction_attempt(self, group, game_seed: int, params: SamplingParams, seed: int, previous: str | None,
                           max_items: int) -> tuple[dict, str]:
        """The episode is shown to the writer turn by turn with its outcome."""
        (episode,) = self._play(group, [game_seed], params, seed, None)
        prompt = game_writer_prompt(self.player.rules, [t.past() for t in episode.turns], episode.observation,
                                    episode.success, previous, max_items, ITEM_MARKER)
        return {"episode_seed": game_seed, **episode.summary(), "score": float(episode.success)}, prompt
