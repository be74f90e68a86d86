"""Sokoban as a text game: our own rules engine, generator and solver (no dependency).

The room size includes its outer wall ring (6x6 = a 4x4 floor, as in the reference). Standard push
rules: you walk one cell at a time; walking into a box pushes it one cell if the cell behind it is
free floor (not a wall, not another box); boxes cannot be pulled. Solved when every box is on a
target. A seeded generator draws rooms and rejects those that are already solved or that the
breadth-first solver cannot solve within the episode's move limit, so every episode can be won.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import gymnasium
from gymnasium import spaces

from opcd.errors import ConfigError
from opcd.games.actions import canonical_move, parse_action

RULES = (
    "You are a warehouse keeper pushing boxes onto storage targets in a room drawn as a grid. Symbols: "
    "# is a wall, _ is floor, T is an empty target, B is a box, * is a box on a target, P is you, + is "
    "you standing on a target. Each move takes you one cell up, down, left or right. Walking into a box "
    "pushes it one cell further in the same direction, but only if that cell is floor or a target; you "
    "can never pull a box. The puzzle is solved when every box is on a target. Answer with one move in "
    "square brackets: [up], [down], [left] or [right] ([w], [s], [a], [d] also work)."
)
STEPS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
Cell = tuple[int, int]


@dataclass(frozen=True)
class Room:
    walls: frozenset[Cell]
    targets: frozenset[Cell]
    height: int
    width: int

    @classmethod
    def parse(cls, rows: list[str]) -> tuple["Room", Cell, frozenset[Cell]]:
        """Rows of symbols (see RULES) -> (room, player, boxes)."""
        walls, targets, boxes, players = set(), set(), set(), []
        for r, row in enumerate(rows):
            for c, ch in enumerate(row):
                if ch == "#":
                    walls.add((r, c))
                if ch in "T*+":
                    targets.add((r, c))
                if ch in "B*":
                    boxes.add((r, c))
                if ch in "P+":
                    players.append((r, c))
                if ch not in "#_T*+BP":
                    raise ValueError(f"unknown Sokoban symbol {ch!r} in row {r}")
        if len({len(row) for row in rows}) != 1:
            raise ValueError(f"Sokoban layout {list(rows)!r}: expected rows of equal length")
        if len(players) != 1 or len(boxes) != len(targets) or not boxes:
            raise ValueError(f"a Sokoban layout needs one player and as many boxes as targets (>= 1), got "
                             f"{len(players)} player(s), {len(boxes)} box(es), {len(targets)} target(s)")
        room = cls(frozenset(walls), frozenset(targets), len(rows), max(map(len, rows)))
        return room, players[0], frozenset(boxes)

    def render(self, player: Cell, boxes: frozenset[Cell]) -> str:
        rows = []
        for r in range(self.height):
            cells = []
            for c in range(self.width):
                at = (r, c)
                if at in self.walls:
                    cells.append("#")
                elif at == player:
                    cells.append("+" if at in self.targets else "P")
                elif at in boxes:
                    cells.append("*" if at in self.targets else "B")
                else:
                    cells.append("T" if at in self.targets else "_")
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def free(self, cell: Cell) -> bool:
        r, c = cell
        return 0 <= r < self.height and 0 <= c < self.width and cell not in self.walls

    def cornered(self, box: Cell) -> bool:
        """A box off target between two perpendicular walls can never move again (a dead end)."""
        if box in self.targets:
            return False
        r, c = box
        vertical = not self.free((r - 1, c)) or not self.free((r + 1, c))
        horizontal = not self.free((r, c - 1)) or not self.free((r, c + 1))
        return vertical and horizontal


def push(room: Room, player: Cell, boxes: frozenset[Cell], move: str) -> tuple[Cell, frozenset[Cell], str]:
    """One move under the push rules -> (player, boxes, what happened): "moved", "pushed", "wall" (the player
    walked into a wall) or "box-wall" / "box-box" (the box ahead cannot move: a wall or another box behind it)."""
    dr, dc = STEPS[move]
    ahead = (player[0] + dr, player[1] + dc)
    if not room.free(ahead):
        return player, boxes, "wall"
    if ahead not in boxes:
        return ahead, boxes, "moved"
    beyond = (ahead[0] + dr, ahead[1] + dc)
    if not room.free(beyond):
        return player, boxes, "box-wall"
    if beyond in boxes:
        return player, boxes, "box-box"
    return ahead, (boxes - {ahead}) | {beyond}, "pushed"


def solve(rows: list[str], max_depth: int) -> list[str] | None:
    """An optimal move list solving the layout within `max_depth` moves (breadth-first search over
    player and box positions), [] if already solved, or None."""
    room, player, boxes = Room.parse(rows)
    if boxes <= room.targets:
        return []
    queue, seen = deque([(player, boxes, [])]), {(player, boxes)}
    while queue:
        player, boxes, path = queue.popleft()
        if len(path) >= max_depth:
            continue
        for move in STEPS:
            new_player, new_boxes, what = push(room, player, boxes, move)
            if new_player == player or (new_player, new_boxes) in seen:
                continue
            if new_boxes <= room.targets:
                return path + [move]
            if what == "pushed" and any(room.cornered(b) for b in new_boxes):
                continue
            seen.add((new_player, new_boxes))
            queue.append((new_player, new_boxes, path + [move]))
    return None


GENERATE_SECONDS = 30.0  # the most one reset() may spend drawing puzzles


class SokobanText(gymnasium.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    rules = RULES

    interior_walls = 1  # at most this many wall cells inside the ring (0 or 1 drawn per puzzle)

    def __init__(self, width: int = 6, height: int = 6, boxes: int = 1, max_steps: int = 5,
                 render_mode: str | None = None):
        floor = (width - 2) * (height - 2)
        interior_walls = self.interior_walls
        if width < 4 or height < 4:
            raise ConfigError(f"Sokoban width={width}, height={height}: expected at least 4x4 (walls included)")
        if not 1 <= boxes or 2 * boxes + 1 + interior_walls > floor:
            raise ConfigError(f"Sokoban boxes={boxes}, interior_walls={interior_walls}: expected at least one box "
                              f"and room for {boxes} box(es), {boxes} target(s) and the player on {floor} floor cells")
        if max_steps < 1:
            raise ConfigError(f"Sokoban max_steps={max_steps}: expected at least 1 move per episode")
        if boxes > max_steps:  # every box is drawn off the targets and needs at least one push
            raise ConfigError(f"Sokoban boxes={boxes}, max_steps={max_steps}: no puzzle with {boxes} boxes is "
                              f"solvable in {max_steps} moves (each box needs a push); expected boxes <= max_steps")
        self.width, self.height, self.num_boxes = width, height, boxes
        self.max_steps = max_steps
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Text(max_length=2 * width * height + height, charset="#_TB*P+ \n")
        self.room: Room | None = None
        self.player: Cell = (0, 0)
        self.boxes: frozenset[Cell] = frozenset()
        self.layout: list[str] = []

    def _draw(self) -> list[str]:
        h, w = self.height, self.width
        grid = [["#"] * w] + [["#"] + ["_"] * (w - 2) + ["#"] for _ in range(h - 2)] + [["#"] * w]
        floor = [(r, c) for r in range(1, h - 1) for c in range(1, w - 1)]
        walls = int(self.np_random.integers(0, self.interior_walls + 1))
        picked = self.np_random.choice(len(floor), size=walls + 2 * self.num_boxes + 1, replace=False)
        cells = [floor[int(i)] for i in picked]
        for r, c in cells[:walls]:
            grid[r][c] = "#"
        for r, c in cells[walls:walls + self.num_boxes]:
            grid[r][c] = "T"
        for r, c in cells[walls + self.num_boxes:walls + 2 * self.num_boxes]:
            grid[r][c] = "B"
        r, c = cells[-1]
        grid[r][c] = "P"
        return ["".join(row) for row in grid]

    def _generate(self) -> list[str]:
        # bounded in tries and in time: a crowded room rarely draws a solvable puzzle, and each try is a search
        deadline = time.monotonic() + GENERATE_SECONDS
        for tries in range(1, 20_001):
            rows = self._draw()
            plan = solve(rows, self.max_steps)
            if plan:  # solvable within the limit and not already solved
                return rows
            if time.monotonic() > deadline:
                break
        raise ConfigError(f"Sokoban {self.width}x{self.height} with {self.num_boxes} box(es): no puzzle solvable "
                          f"within max_steps={self.max_steps} moves was found in {tries} tries; raise the move "
                          f"limit or use fewer boxes")

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        layout = (options or {}).get("layout")
        self.layout = [str(row) for row in layout] if layout else self._generate()
        self.room, self.player, self.boxes = Room.parse(self.layout)
        return self.render(), {"success": False, "invalid": False,
                               "feedback": "The puzzle starts; push every box onto a target."}

    @property
    def solved(self) -> bool:
        return self.boxes <= self.room.targets

    def step(self, action):
        move = canonical_move(action)
        if move is None:
            return self.render(), 0.0, False, False, {
                "success": False, "invalid": True,
                "feedback": "No valid move was found in the answer, so nothing moved."}
        self.player, self.boxes, what = push(self.room, self.player, self.boxes, move)
        feedback = _feedback(self.room, self.boxes, move, what)
        return self.render(), float(self.solved), self.solved, False, {
            "success": self.solved, "invalid": False, "feedback": feedback}

    def action_from_text(self, text: str) -> str | None:
        return parse_action(text)

    def render(self) -> str:
        return self.room.render(self.player, self.boxes) if self.room else ""


def _feedback(room: Room, boxes: frozenset[Cell], move: str, what: str) -> str:
    """One sentence (two at most) on what a move did, for the player's next turn."""
    feedback = {
        "moved": f"You moved {move}.",
        "pushed": f"You moved {move} and pushed the box one cell.",
        "wall": f"You tried to move {move} but a wall is in the way, so you stayed put.",
        "box-wall": f"You tried to push a box {move} but a wall is behind it, so nothing moved.",
        "box-box": f"You tried to push a box {move} but another box is behind it, so nothing moved.",
    }[what]
    if boxes <= room.targets:
        return feedback + " Every box is on a target: puzzle solved!"
    if what == "pushed" and any(room.cornered(b) for b in boxes):
        return feedback + " A box is now stuck in a corner off the targets, so this puzzle can no longer be solved."
    return feedback
