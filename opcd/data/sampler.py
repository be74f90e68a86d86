"""Which training examples each step uses: a seeded permutation per epoch, with a resumable position.

The state is two integers (epoch, offset), saved in every checkpoint, so a resumed run draws exactly
the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from opcd.data.rows import shuffled_order


@dataclass
class BatchSampler:
    num_examples: int
    batch_size: int
    seed: int
    epoch: int = 0
    offset: int = 0

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError("BatchSampler needs at least one example")

    def next_batch(self) -> list[int]:
        """Indices of the next batch; crosses epoch boundaries (a new permutation per epoch)."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.offset >= self.num_examples:
                self.epoch, self.offset = self.epoch + 1, 0
            order = shuffled_order(self.num_examples, self.seed, self.epoch)
            take = min(self.batch_size - len(batch), self.num_examples - self.offset)
            batch.extend(order[self.offset:self.offset + take])
            self.offset += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
