"""The text-game environments (opcd/games): dynamics on hand-written boards, generators (every
puzzle solvable within the move limit), seeding, action parsing, the registry and its errors."""

from __future__ import annotations

import sys
import types

import gymnasium
import numpy as np
import pytest

from opcd.errors import ConfigError
from opcd.games.actions import canonical_move, parse_action
from opcd.games.frozenlake import FrozenLakeText, shortest_path
from opcd.games.registry import make_game, register_with_gymnasium
from opcd.games.sokoban import Room, SokobanText, solve


# -- actions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, move", [
    ("[up]", "up"), ("I go [left] no wait [right]", "right"), ("[ Down ]", "down"), ("[W]", "up"),
    ("[a]", "left"), ("[s] then [d]", "right"), ("go up", None), ("[north]", None), ("[up down]", None),
    ("[1]", None), ("[up] and finally [north]", "up"), ("", None), ("(up)", None),
])
def test_parse_action(text, move):
    assert parse_action(text) == move


def test_step_accepts_names_and_gymnasium_indices():
    assert [canonical_move(a) for a in ("up", "W", 0, np.int64(1), 2, 3, None)] == [
        "up", "up", "left", "down", "right", "up", None]
    with pytest.raises(ValueError, match="unknown action 4"):
        canonical_move(4)


# -- FrozenLake --------------------------------------------------------------------------------------------
LAKE = ["SFF", "FHF", "HFG"]


def _lake(layout=LAKE, max_steps=5):
    env = FrozenLakeText(size=len(layout), max_steps=max_steps)
    observation, info = env.reset(seed=0, options={"layout": layout})
    return env, observation, info


def test_frozenlake_moves_edges_and_goal():
    env, observation, info = _lake()
    assert observation == "P _ _\n_ O _\nO _ G" and not info["success"]
    observation, reward, terminated, _, info = env.step("up")  # the edge: stays
    assert observation.startswith("P") and reward == 0 and not terminated and "edge" in info["feedback"]
    for move in ("right", "right", "down"):
        observation, reward, terminated, _, info = env.step(move)
        assert reward == 0 and not terminated
    observation, reward, terminated, _, info = env.step(1)  # gymnasium index 1 = down
    assert reward == 1.0 and terminated and info["success"] and observation.endswith("P")


def test_frozenlake_hole_ends_the_game_as_a_loss():
    env, _, _ = _lake()
    env.step("right")
    observation, reward, terminated, _, info = env.step("down")  # onto the hole in the middle
    assert terminated and reward == 0 and not info["success"] and "hole" in info["feedback"]


def test_frozenlake_invalid_move_leaves_the_board():
    env, observation, info = _lake()
    assert info["success"] is False and info["feedback"]
    again, reward, terminated, _, info = env.step(None)
    assert again == observation and info["invalid"] and reward == 0 and not terminated
    assert "no valid move" in info["feedback"].lower() and env.observation_space.contains(again)


def test_frozenlake_rejects_a_malformed_layout():
    with pytest.raises(ValueError, match="one S and one G"):
        _lake(["SFF", "FXF", "FFG"])


def test_frozenlake_generator_matches_the_reference_setting():
    env = FrozenLakeText()
    boards = set()
    for seed in range(300):
        env.reset(seed=seed)
        flat = "".join(env.layout)
        assert flat.count("H") == 2 and env.layout[0][0] == "S" and env.layout[2][2] == "G"
        assert shortest_path(env.layout) <= 5
        boards.add(flat)
    assert len(boards) > 5
    first = FrozenLakeText().reset(seed=42)[0]
    np.random.seed(0)
    env.reset(seed=7)
    assert env.reset(seed=42)[0] == first  # same seed, same board, whatever ran before


def test_frozenlake_impossible_settings_are_config_errors():
    with pytest.raises(ConfigError, match="size=4 needs at least 6 moves"):
        FrozenLakeText(size=4, max_steps=5)
    with pytest.raises(ConfigError, match="holes=5"):
        FrozenLakeText(size=3, holes=5)


# -- Sokoban -------------------------------------------------------------------------------------------------
ROOM = ["######",
        "#____#",
        "#_PB_#",
        "#___T#",
        "#____#",
        "######"]


def _sokoban(layout=ROOM, max_steps=5):
    env = SokobanText(max_steps=max_steps)
    observation, info = env.reset(seed=0, options={"layout": layout})
    return env, observation, info


def test_sokoban_render_uses_the_documented_symbols():
    _, observation, _ = _sokoban()
    assert observation.splitlines()[2] == "# _ P B _ #" and observation.splitlines()[3] == "# _ _ _ T #"


def test_sokoban_push_then_solve():
    env, _, _ = _sokoban()
    observation, reward, terminated, _, info = env.step("right")  # push the box right
    assert observation.splitlines()[2] == "# _ _ P B #" and "pushed" in info["feedback"] and reward == 0
    env.step("up")
    env.step("right")
    observation, reward, terminated, _, info = env.step("down")  # push it down onto the target
    assert reward == 1.0 and terminated and info["success"] and "*" in observation


def test_sokoban_walls_and_blocked_pushes():
    env, _, _ = _sokoban(["######",
                          "#P___#",
                          "#B___#",
                          "#B_T_#",
                          "#___T#",
                          "######"])
    before = env.render()
    observation, *_, info = env.step("up")  # wall
    assert observation == before and "wall" in info["feedback"]
    observation, *_, info = env.step("down")  # a box with another box behind it
    assert observation == before and "another box is behind" in info["feedback"]
    env2, before, _ = _sokoban(["######", "#_PB##", "#___T#", "#____#", "#____#", "######"])
    observation, *_, info = env2.step("right")  # a box against a wall cannot move
    assert observation == before and "wall is behind" in info["feedback"]


def test_sokoban_invalid_move_changes_nothing():
    env, observation, _ = _sokoban()
    again, reward, terminated, truncated, info = env.step(None)
    assert again == observation and info["invalid"] and not info["success"]
    assert reward == 0 and not terminated and not truncated and env.observation_space.contains(again)


def test_sokoban_box_pushed_into_a_corner_is_reported_stuck():
    env, _, _ = _sokoban(["######",
                          "#_BP_#",
                          "#____#",
                          "#___T#",
                          "#____#",
                          "######"])
    _, reward, terminated, _, info = env.step("left")  # the box lands in the top-left corner
    assert "stuck" in info["feedback"] and not terminated and reward == 0
    assert solve(["######", "#B_P_#", "#____#", "#___T#", "#____#", "######"], 20) is None


def test_solver_is_optimal_and_respects_the_limit():
    assert solve(ROOM, 5) == ["right", "up", "right", "down"]
    assert solve(ROOM, 3) is None
    room, player, boxes = Room.parse(ROOM)
    assert player == (2, 2) and boxes == frozenset({(2, 3)}) and room.targets == frozenset({(3, 4)})


def test_every_generated_sokoban_is_solvable_within_the_limit_and_replays():
    env = SokobanText()
    for seed in range(300):
        env.reset(seed=seed)
        plan = solve(env.layout, 5)
        assert plan, f"seed {seed}: {env.layout}"  # solvable, and not already solved
        for move in plan:
            _, reward, terminated, _, info = env.step(move)
        assert terminated and reward == 1.0 and info["success"], seed
    boards = {tuple(SokobanText().reset(seed=s)[0]) for s in range(20)}
    assert len(boards) > 10
    assert SokobanText().reset(seed=7)[0] == SokobanText().reset(seed=7)[0]


def test_sokoban_impossible_settings_are_config_errors():
    with pytest.raises(ConfigError, match="max_steps=0"):
        SokobanText(max_steps=0)
    with pytest.raises(ConfigError, match="boxes=8"):
        SokobanText(boxes=8)
    with pytest.raises(ConfigError, match="boxes=3, max_steps=1: no puzzle with 3 boxes is solvable in 1 moves"):
        SokobanText(boxes=3, max_steps=1)


def test_sokoban_generation_is_bounded_in_time(monkeypatch):
    """Bug: `game.width=10 game.height=10 game.boxes=12` was accepted and stuck in reset() > 200 s. Twelve
    boxes in five moves is refused at once; a crowded room that rarely draws a solvable puzzle stops
    drawing after GENERATE_SECONDS with one line."""
    import time

    from opcd.games import sokoban

    with pytest.raises(ConfigError, match="boxes=12, max_steps=5"):
        SokobanText(width=10, height=10, boxes=12)
    monkeypatch.setattr(sokoban, "GENERATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"no puzzle solvable within max_steps=5 moves was found in \d+ tries"):
        SokobanText(width=10, height=10, boxes=5, max_steps=5).reset(seed=0)
    assert time.monotonic() - start < 10


def test_larger_sokoban_settings():
    env = SokobanText(width=7, height=7, boxes=2, max_steps=8)
    observation, _ = env.reset(seed=3)
    assert observation.count("B") + observation.count("*") == 2 and len(observation.splitlines()) == 7
    assert solve(env.layout, 8)


# -- registry --------------------------------------------------------------------------------------------------
def test_registry_names_aliases_and_gymnasium():
    assert isinstance(make_game("FrozenLake-v0-raw"), FrozenLakeText)
    assert isinstance(make_game("Sokoban-v0", boxes=1), SokobanText)
    register_with_gymnasium()  # a second registration is a no-op
    env = gymnasium.make("opcd/Sokoban-v0", render_mode="ansi")
    observation, _ = env.reset(seed=1)
    assert ("P" in observation or "+" in observation) and env.render() == observation
    observation, _ = gymnasium.make("opcd/FrozenLake-v0").reset(seed=1)
    assert observation.startswith("P") and observation.endswith("G")


def test_registry_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^unknown text game 'Chess-v0': expected one of FrozenLake-v0, "
                                          r"FrozenLake-v0-raw, Sokoban-v0 or textarena:<TextArena env id>$"):
        make_game("Chess-v0")
    with pytest.raises(ConfigError, match=r"^game\.boxes does not apply to FrozenLake-v0"):
        make_game("FrozenLake-v0", boxes=2)
    with pytest.raises(ConfigError, match=r"^game\.depth, game\.holes do not apply to Sokoban-v0: its settings are "
                                          r"game\.boxes, game\.height, game\.width$"):
        make_game("Sokoban-v0", holes=2, depth=3)
    with pytest.raises(ConfigError, match="takes no board settings, got game.size"):
        make_game("textarena:FrozenLake-v0", size=4)


def test_textarena_adapter_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "textarena", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"^text game 'textarena:Foo-v0' needs the textarena package: "
                                          r"pip install 'opcd\[textarena\]'$"):
        make_game("textarena:Foo-v0")


class _FakeTextArenaEnv:
    """TextArena 0.7's single-player API: the game ends after two answers, won only if the last says [down];
    a lost game still earns partial progress, as TextArena's games do."""

    def reset(self, num_players, seed=None):
        assert num_players == 1
        self.turns, self.seed = 0, seed

    def get_observation(self):
        return 0, f"board after {self.turns} answers (seed {self.seed})"

    def step(self, action):
        self.turns += 1
        self.last = action
        return self.turns == 2, {}

    def close(self):
        won = "[down]" in self.last
        return {0: 1.0 if won else 0.5}, {0: {"reason": "won" if won else "lost halfway"}}


@pytest.mark.parametrize("last, success, feedback", [("[down]", True, "won"), ("[up]", False, "lost halfway")])
def test_textarena_adapter_plays_through_the_textarena_api(monkeypatch, last, success, feedback):
    monkeypatch.setitem(sys.modules, "textarena", types.SimpleNamespace(make=lambda env_id: _FakeTextArenaEnv()))
    env = make_game("textarena:Fake-v0")
    observation, info = env.reset(seed=3)
    assert observation == "board after 0 answers (seed 3)" and not info["success"]
    assert env.action_from_text("I think [left]") == "I think [left]"
    observation, reward, terminated, _, info = env.step("[left]")
    assert observation == "board after 1 answers (seed 3)" and not terminated and reward == 0
    _, reward, terminated, truncated, info = env.step(last)
    assert terminated and not truncated and info["success"] is success and reward == float(success)
    assert info["feedback"] == feedback and info["textarena_reward"] == (1.0 if success else 0.5)


def test_textarena_adapter_plays_an_episode():
    pytest.importorskip("textarena")
    env = make_game("textarena:FrozenLake-v0")
    observation, _ = env.reset(seed=0)
    assert observation
    _, reward, terminated, _, info = env.step("[down]")
    assert reward in (0.0, 1.0) and isinstance(info["feedback"], str)
