"""Playing text games with a language model: many episodes stepped together, one batched generation
call per turn (method.md §4), and turning the played episodes into training sequences.

A turn: every unfinished episode's prompt goes into one `generate` call; the last bracketed move of
each answer is played (none found = an invalid move: the board stays, the turn is used up); an
episode ends when solved, lost (FrozenLake hole) or out of moves (`max_steps`).

Training layouts (`mode`):

* ``turn``: every turn is an independent sample, prompt = that turn's message (the reference);
* ``trajectory``: every episode is ONE sequence, the first message then answer, next message,
  answer...; the model's answers are trained on (`loss_mask`), the environment's messages between
  them are context only. The sequence is built from the tokens actually generated (never re-tokenised
  text), so the student and teacher score exactly what the player produced.

The teacher always sees the same turns with an experience block added (`opcd/games/prompts.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from opcd.data.batching import right_pad
from opcd.games.actions import MOVES
from opcd.games.prompts import PastTurn, first_message, next_message, turn_message
from opcd.errors import DataError
from opcd.data.prompts import encode_chat
from opcd.protocol import Generation, SamplingParams

Mode = Literal["turn", "trajectory"]
GenerateFn = Callable[[list[list[int]], SamplingParams, int], Generation]
_SENTINEL = "\u2063OPCD-TURN-END\u2063"  # marks where an answer ends in a rendered template


@dataclass
class Turn:
    observation: str  # the board the answer was given for
    remaining: int  # moves left including this one
    prompt_ids: list[int]  # what the player saw (trajectory mode: the whole sequence so far)
    response_ids: list[int]  # generated tokens, EOS included when the answer ended with it
    topk_ids: torch.Tensor | None  # [len(response_ids), k]: the player's top-k ids at each answer token
    response: str  # decoded answer
    action: str | None  # the move played as shown in later prompts (None: no valid move found)
    feedback: str  # the environment's sentence about it
    invalid: bool = False  # no valid move in the answer (the turn is used up, the board stays)

    def past(self) -> PastTurn:
        return PastTurn(self.observation, self.response, self.action, self.feedback, self.invalid)


@dataclass
class Episode:
    seed: int
    first_observation: str
    turns: list[Turn] = field(default_factory=list)
    joins: list[list[int]] = field(default_factory=list)  # trajectory mode: tokens between answer i and i+1
    observation: str = ""  # the current (at the end: final) board
    success: bool = False
    done: bool = False

    @property
    def invalid_moves(self) -> int:
        return sum(turn.invalid for turn in self.turns)

    def summary(self) -> dict:
        return {"seed": self.seed, "success": self.success, "turns": len(self.turns),
                "invalid_moves": self.invalid_moves,
                "moves": [turn.action for turn in self.turns], "final_board": self.observation,
                "answers": [turn.response for turn in self.turns]}


class GamePlayer:
    """Plays one game (`make_game()` builds a fresh environment) and shapes episodes for training."""

    def __init__(self, make_game: Callable[[], object], tokenizer, max_steps: int, mode: Mode = "turn",
                 enable_thinking: bool | None = None, max_prompt_length: int = 0):
        self.make_game = make_game
        self.max_prompt_length = max_prompt_length  # 0 = unchecked
        self.tokenizer = tokenizer
        self.max_steps = max_steps
        self.mode = mode
        self.enable_thinking = enable_thinking
        self.rules = make_game().rules
        self.eos_ids = {tokenizer.eos_token_id}

    # -- prompts ------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self._checked(encode_chat(self.tokenizer, [{"role": "user", "content": text}], self.enable_thinking))

    def _checked(self, ids: list[int]) -> list[int]:
        if self.max_prompt_length and len(ids) > self.max_prompt_length:
            raise DataError(f"a text-game prompt has {len(ids)} tokens, over task.max_prompt_length="
                            f"{self.max_prompt_length} (raise it, or lower game.max_steps / "
                            f"task.experience_max_length / rollout.max_response_length)")
        return ids

    def state_prompt(self, history: list[PastTurn], observation: str, remaining: int,
                     experience: str | None) -> list[int]:
        """Per-turn prompt for a stored state (OEL trains on states visited earlier)."""
        return self._encode(turn_message(self.rules, history, observation, remaining, experience))

    def turn_prompt(self, episode: Episode, index: int, experience: str | None) -> list[int]:
        """Per-turn prompt for turn `index` of `episode` (the turns before it are its history)."""
        history = [turn.past() for turn in episode.turns[:index]]
        observation = episode.turns[index].observation if index < len(episode.turns) else episode.observation
        return self._encode(turn_message(self.rules, history, observation, self.max_steps - index, experience))

    def first_prompt(self, episode: Episode, experience: str | None) -> list[int]:
        return self._encode(first_message(self.rules, episode.first_observation, self.max_steps, experience))

    def join_ids(self, answer_ids: list[int], message: str) -> list[int]:
        """Tokens that follow an answer in a conversation: the end of the assistant turn (unless the
        answer already ended with the EOS that closes it), the next user message and the generation
        header. Taken from the chat template rendered around a sentinel answer."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "."}, {"role": "assistant", "content": _SENTINEL},
             {"role": "user", "content": message}], tokenize=False, add_generation_prompt=True,
            **({} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}))
        after = text.rsplit(_SENTINEL, 1)[1]
        if answer_ids and answer_ids[-1] in self.eos_ids:
            eos_text = self.tokenizer.decode([answer_ids[-1]])
            if after.startswith(eos_text):
                after = after[len(eos_text):]
        return self.tokenizer(after, add_special_tokens=False)["input_ids"]

    # -- playing ------------------------------------------------------------------------------------
    def play(self, generate: GenerateFn, seeds: list[int], params: SamplingParams, seed: int,
             experience: str | list[str | None] | None = None) -> list[Episode]:
        """One episode per seed, all stepped together; the player sees `experience` when given (one
        text for all, or one per episode)."""
        shown = experience if isinstance(experience, list) else [experience] * len(seeds)
        games, episodes = [], []
        for game_seed in seeds:
            game = self.make_game()
            observation, _ = game.reset(seed=game_seed)
            games.append(game)
            episodes.append(Episode(game_seed, observation, observation=observation))
        sequences = [self.first_prompt(e, x) for e, x in zip(episodes, shown)] if self.mode == "trajectory" else None
        for turn_index in range(self.max_steps):
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            if self.mode == "trajectory":
                prompts = [list(sequences[i]) for i in active]
            else:
                prompts = [self._encode(turn_message(self.rules, [t.past() for t in episodes[i].turns],
                                                     episodes[i].observation, self.max_steps - turn_index,
                                                     shown[i])) for i in active]
            generation = generate(prompts, params, seed * 1_000 + turn_index)
            lengths = generation.response_lengths.tolist()
            for row, i in enumerate(active):
                ids = generation.response_ids[row, :lengths[row]].tolist()
                topk = None if generation.topk_ids is None else generation.topk_ids[row, :lengths[row]]
                self._apply(games[i], episodes[i], prompts[row], ids, topk, turn_index)
                if self.mode == "trajectory" and not episodes[i].done:
                    join = self.join_ids(ids, next_message(episodes[i].turns[-1].feedback, episodes[i].observation,
                                                           self.max_steps - turn_index - 1))
                    episodes[i].joins.append(join)
                    # bounded by construction: max_steps answers of max_new_tokens plus the short joins
                    sequences[i] = sequences[i] + ids + join
        return episodes

    def _apply(self, game, episode: Episode, prompt: list[int], ids: list[int], topk, turn_index: int) -> None:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        action = game.action_from_text(text)
        observation, _reward, terminated, _truncated, info = game.step(action)
        invalid = action is None or bool(info.get("invalid", False))
        # a move name is shown as played; an adapter that passes the whole answer through shows none
        shown = action if isinstance(action, str) and action in MOVES and not invalid else None
        episode.turns.append(Turn(episode.observation, self.max_steps - turn_index, prompt, ids, topk, text,
                                  shown, info.get("feedback", ""), invalid))
        episode.observation = observation
        episode.success = bool(info.get("success", False))
        episode.done = bool(terminated) or episode.success or turn_index + 1 >= self.max_steps

    # -- training sequences ---------------------------------------------------------------------------
    def training_batch(self, episodes: list[Episode], experiences: list[str]) -> tuple[
            list[list[int]], list[list[int]], Generation]:
        """(student prompts, teacher prompts, the sequences to score) for the layout in `mode`;
        `experiences[i]` is the teacher's experience for episode i. Whoever played (the student
        without experience, or an off-policy teacher with it), the student side has no experience."""
        if self.mode == "trajectory":
            return self._trajectory_batch(episodes, experiences)
        students, teachers, responses, topks = [], [], [], []
        for episode, experience in zip(episodes, experiences):
            for index, turn in enumerate(episode.turns):
                # rebuilt, not `turn.prompt_ids`: an off-policy teacher played WITH experience
                students.append(self.turn_prompt(episode, index, None))
                teachers.append(self.turn_prompt(episode, index, experience))
                responses.append(turn.response_ids)
                topks.append(turn.topk_ids)
        ids, mask = right_pad(responses, self.tokenizer.pad_token_id)
        return students, teachers, Generation(ids, mask, _pad_topk(topks, ids.shape[1]))

    @staticmethod
    def sequence_keys(episodes: list[Episode], mode: Mode) -> list[str]:
        """One id per training sequence of `training_batch` (to check stored data against a dataset)."""
        if mode == "trajectory":
            return [f"game:{e.seed}" for e in episodes]
        return [f"game:{e.seed}:turn:{i}" for e in episodes for i in range(len(e.turns))]

    def _trajectory_batch(self, episodes: list[Episode], experiences: list[str]):
        students, teachers, sequences, trained, topks = [], [], [], [], []
        for episode, experience in zip(episodes, experiences):
            students.append(self.first_prompt(episode, None))
            teachers.append(self.first_prompt(episode, experience))
            tokens, is_answer, rows = [], [], []
            for index, turn in enumerate(episode.turns):
                tokens += turn.response_ids
                is_answer += [True] * len(turn.response_ids)
                rows.append(turn.topk_ids)
                if index < len(episode.joins):
                    join = episode.joins[index]
                    tokens += join
                    is_answer += [False] * len(join)
                    rows.append(None if turn.topk_ids is None else
                                torch.zeros(len(join), turn.topk_ids.shape[-1], dtype=torch.long))
            sequences.append(tokens)
            trained.append(is_answer)
            topks.append(None if any(r is None for r in rows) else torch.cat(rows))
        ids, mask = right_pad(sequences, self.tokenizer.pad_token_id)
        loss_mask = torch.zeros_like(mask)
        for row, flags in enumerate(trained):
            loss_mask[row, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
        return students, teachers, Generation(ids, mask, _pad_topk(topks, ids.shape[1]), loss_mask)


def _pad_topk(rows: list[torch.Tensor | None], width: int) -> torch.Tensor | None:
    if not rows or any(r is None for r in rows):
        return None
    k = rows[0].shape[-1]
    out = torch.zeros(len(rows), width, k, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :row.shape[0]] = row
    return out


def episode_metrics(episodes: list[Episode], max_new_tokens: int = 0) -> dict[str, float]:
    """Pass rate, moves and invalid moves per episode, answer tokens per turn, and the share of answers
    cut at `max_new_tokens` (0: not counted)."""
    turns = [turn for e in episodes for turn in e.turns]
    count = max(len(episodes), 1)
    return {"pass_rate": sum(e.success for e in episodes) / count,
            "turns_per_episode": len(turns) / count,
            "invalid_moves_per_episode": sum(e.invalid_moves for e in episodes) / count,
            "invalid_move_rate": sum(t.invalid for t in turns) / max(len(turns), 1),
            "tokens_per_turn": sum(len(t.response_ids) for t in turns) / max(len(turns), 1),
            "clipped_turn_rate": (sum(len(t.response_ids) >= max_new_tokens for t in turns) / max(len(turns), 1)
                                  if max_new_tokens > 0 else 0.0)}
