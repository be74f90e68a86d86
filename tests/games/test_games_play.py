"""Multi-turn play and the training sequences built from it (opcd/games/play.py, opcd/games/prompts.py).

The player is driven by a scripted "model" (fixed answers, real SmolLM2 tokenizer) so every turn's
outcome is known; a small corridor game stands in for a board where the tests need exact control,
and the real FrozenLake checks the wiring with the registered environments.
"""

from __future__ import annotations

import gymnasium
import pytest
import torch

from opcd.games.actions import parse_action
from opcd.games.play import GamePlayer, episode_metrics
from opcd.games.prompts import EXPERIENCE_BLOCK, PastTurn, turn_message
from opcd.games.registry import make_game
from opcd.protocol import Generation, SamplingParams


class Corridor(gymnasium.Env):
    """Player at cell 0 of a corridor, goal at cell `length`; only [right]/[left] move."""

    rules = "Walk along the corridor to the goal G. Answer with [left] or [right]."

    def __init__(self, length: int = 2):
        self.length, self.position = length, 0

    def _board(self) -> str:
        return " ".join("P" if i == self.position else ("G" if i == self.length else "_")
                        for i in range(self.length + 1))

    def reset(self, seed=None, options=None):
        self.position = 0
        return self._board(), {"success": False, "feedback": "Start."}

    def step(self, action):
        if action is None:
            return self._board(), 0.0, False, False, {"success": False, "feedback": "No valid move.", "invalid": True}
        self.position = max(0, self.position + {"right": 1, "left": -1}.get(action, 0))
        won = self.position == self.length
        return self._board(), float(won), won, False, {"success": won, "feedback": f"You went {action}.",
                                                        "invalid": False}

    def action_from_text(self, text):
        return parse_action(text)


class Scripted:
    """A generate function answering each call's prompts with the next scripted texts (one per prompt),
    each ended with the EOS token; records the prompts it saw."""

    def __init__(self, tokenizer, answers: list[list[str]]):
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def __call__(self, prompts, params, seed) -> Generation:
        texts = self.answers.pop(0)
        assert len(texts) == len(prompts)
        self.calls.append([self.tokenizer.decode(p) for p in prompts])
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
        topk = torch.stack([ids + j for j in range(3)], dim=-1) if params.record_topk else None
        return Generation(ids, mask, topk)


PARAMS = SamplingParams(max_new_tokens=32, record_topk=3)


def _player(tokenizer, mode="turn", max_steps=3):
    return GamePlayer(lambda: Corridor(2), tokenizer, max_steps, mode)


def test_turn_prompt_golden():
    history = [PastTurn("P _ G", "I try [right]", "right", "You went right."),
               PastTurn("_ P G", "hmm", None, "No valid move.", invalid=True)]
    assert turn_message("RULES", history, "_ P G", 1, experience="[exp] go right") == (
        "RULES\n\n"
        "Lessons written after earlier games of this kind:\n[exp] go right\n"
        "Use the lessons that fit the situation below.\n\n"
        "The game so far:\n"
        "Board before move 1:\nP _ G\nMove 1: [right]. You went right.\n"
        "Board before move 2:\n_ P G\nMove 2: no valid move. No valid move.\n\n"
        "Current board:\n_ P G\n\n"
        "One move left. Think briefly if it helps, then give your next move as exactly one of "
        "[up], [down], [left] or [right].")


def test_episodes_follow_the_last_bracketed_move_and_count_invalid_moves(smollm2_tokenizer):
    player = _player(smollm2_tokenizer)
    script = Scripted(smollm2_tokenizer, [
        ["[left] no, [right]", "I will not move", "[up]"],  # turn 1: right / invalid / up (no effect)
        ["[right]", "[right]", "[left]"],  # turn 2: episode 0 wins
        ["[right]", "[right]"],  # turn 3: only the two unfinished episodes are asked; episode 1 wins
    ])
    episodes = player.play(script, seeds=[1, 2, 3], params=PARAMS, seed=0)
    assert [e.success for e in episodes] == [True, True, False]
    assert [len(e.turns) for e in episodes] == [2, 3, 3]
    assert [e.invalid_moves for e in episodes] == [0, 1, 0]
    assert [t.action for t in episodes[1].turns] == [None, "right", "right"]
    assert script.answers == []
    figures = episode_metrics(episodes, max_new_tokens=32)
    assert figures["pass_rate"] == pytest.approx(2 / 3)
    assert figures["invalid_moves_per_episode"] == pytest.approx(1 / 3)
    # the third prompt of episode 1 shows its history: the invalid turn, then the move right
    last_prompt = script.calls[2][0]
    assert "Move 1: no valid move. No valid move." in last_prompt and "Move 2: [right]. You went right." in last_prompt
    assert "One move left" in last_prompt


def test_turn_mode_samples_pair_each_turn_with_the_teachers_prompt(smollm2_tokenizer):
    player = _player(smollm2_tokenizer, max_steps=2)
    script = Scripted(smollm2_tokenizer, [["[right]", "[left]"], ["[right]", "[left]"]])
    episodes = player.play(script, seeds=[1, 2], params=PARAMS, seed=0)
    students, teachers, generation = player.training_batch(episodes, ["[exp] lesson A", "[exp] lesson B"])
    assert len(students) == len(teachers) == generation.response_ids.shape[0] == 4
    assert generation.loss_mask is None and generation.topk_ids.shape[:2] == generation.response_ids.shape
    for student, teacher, lesson in zip(students, teachers, ["A", "A", "B", "B"]):
        s, t = smollm2_tokenizer.decode(student), smollm2_tokenizer.decode(teacher)
        block = EXPERIENCE_BLOCK.format(experience=f"[exp] lesson {lesson}")
        assert block in t and block not in s
        assert t.replace("\n\n" + block.rstrip("\n"), "") == s  # the teacher sees the same turn plus the block


def test_trajectory_sequence_is_the_chat_template_of_the_episode(smollm2_tokenizer):
    """Guards the token assembly of trajectory mode: prompt + sequence must render exactly the
    conversation (user, answer, user, answer...), and the loss mask must cover exactly the model's
    answer tokens (EOS included) and nothing the environment wrote."""
    tok = smollm2_tokenizer
    player = _player(tok, mode="trajectory", max_steps=3)
    answers = [["[up] first"], ["[right] then"], ["[right] done"]]
    script = Scripted(tok, answers)
    (episode,) = player.play(script, seeds=[7], params=PARAMS, seed=0)
    assert episode.success and len(episode.turns) == 3
    students, teachers, generation = player.training_batch([episode], ["[exp] keep right"])
    sequence = generation.response_ids[0][generation.response_mask[0]].tolist()
    messages = [{"role": "user", "content": player_first(player, episode)}]
    for turn, next_turn in zip(episode.turns, episode.turns[1:] + [None]):
        messages.append({"role": "assistant", "content": turn.response})
        if next_turn is not None:
            messages.append({"role": "user", "content": next_turn_message(turn, next_turn, player)})
    expected = tok.apply_chat_template(messages, tokenize=False)
    rendered = tok.decode(students[0] + sequence)
    assert expected.startswith(rendered) and expected[len(rendered):].strip() == ""  # template adds only "\n"
    trained = generation.response_ids[0][generation.loss_mask[0]].tolist()
    assert trained == [i for turn in episode.turns for i in turn.response_ids]
    assert int(generation.loss_mask.sum()) == sum(len(t.response_ids) for t in episode.turns)
    # the player saw its own tokens: each later prompt is the previous prompt + answer + join
    assert episode.turns[1].prompt_ids[:len(episode.turns[0].prompt_ids)] == episode.turns[0].prompt_ids
    assert "[exp] keep right" in tok.decode(teachers[0]) and "[exp]" not in tok.decode(students[0])


def player_first(player, episode):
    from opcd.games.prompts import first_message

    return first_message(player.rules, episode.first_observation, player.max_steps)


def next_turn_message(turn, next_turn, player):
    from opcd.games.prompts import next_message

    return next_message(turn.feedback, next_turn.observation, next_turn.remaining)


def test_prompt_over_budget_is_a_clear_error(smollm2_tokenizer):
    from opcd.errors import DataError

    player = GamePlayer(lambda: Corridor(2), smollm2_tokenizer, 3, "turn", max_prompt_length=20)
    with pytest.raises(DataError, match=r"text-game prompt has \d+ tokens, over task.max_prompt_length=20"):
        player.play(Scripted(smollm2_tokenizer, [["[right]"]]), [0], PARAMS, 0)


@pytest.mark.parametrize("name", ["FrozenLake-v0-raw", "Sokoban-v0"])
def test_registered_games_play_to_the_end(smollm2_tokenizer, name):
    player = GamePlayer(lambda: make_game(name, max_steps=4), smollm2_tokenizer, 4, "turn")
    moves, calls = ["[right]", "[down]", "nothing", "[s]"], []

    def generate(prompts, params, seed):  # every unfinished episode gets this turn's scripted move
        move = moves[len(calls)]
        calls.append(len(prompts))
        return Scripted(smollm2_tokenizer, [[move] * len(prompts)])(prompts, params, seed)

    episodes = player.play(generate, seeds=list(range(6)), params=PARAMS, seed=0)
    assert calls[0] == 6 and calls == sorted(calls, reverse=True)
    for e in episodes:
        assert 1 <= len(e.turns) <= 4
        assert e.invalid_moves == sum(t.response == "nothing" for t in e.turns)
        if not e.success and len(e.turns) < 4:
            assert name.startswith("FrozenLake")  # only a hole ends an episode early without a win
    calls.clear()
    again = player.play(generate, seeds=[3], params=PARAMS, seed=0)
    assert again[0].first_observation == episodes[3].first_observation  # same seed, same board


def test_training_and_heldout_seeds_are_disjoint_and_pure():
    from opcd.data.seeds import HELDOUT_BASE, heldout_seeds, training_seeds

    seen = set()
    for run_seed in (0, 1, 10, 2**28 - 1):
        for step in (1, 2, 50, 2**24 - 1):
            seeds = training_seeds(run_seed, step, 1000)
            assert len(set(seeds)) == 1000 and not seen & set(seeds) and max(seeds) < HELDOUT_BASE
            seen |= set(seeds)
    assert training_seeds(3, 7, 5) == training_seeds(3, 7, 5)
    assert min(heldout_seeds(128)) == HELDOUT_BASE
    with pytest.raises(ValueError, match="at most 1024 episodes"):
        training_seeds(0, 1, 2000)
