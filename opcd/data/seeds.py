"""Every seed formula of a run, in one place: off-policy data only matches an on-policy run, and a
resumed run only replays its batches, while all pipelines derive their seeds the same way.

* step s of a run with seed r generates with `step_seed(r, s)` (OEL's deploy round r too);
* extraction step s scores the held-out set with `extraction_heldout_seed` and solves its next
  item with `extraction_attempt_seed` (the writer then uses `writer_seed` of that);
* every evaluation generates with `eval_seed(r)`, so checkpoints and baselines see the same draws;
* within one generate call with seed c, prompt i samples with `prompt_seed(c, i)`, whatever else is
  in the batch, so a call split over ranks samples what one rank would;
* text games: training episode j of step s of run r is (r << 34) | (s << 10) | j, below 2**62;
  held-out episodes start at 2**62, so a pass rate is never measured on a board trained on.

All pure functions.
"""

from __future__ import annotations

STEP_STRIDE = 1_000_003  # a prime above any step count: (seed, step) pairs never collide
EVAL_OFFSET = 7_919  # evaluation draws differ from step 0's
DEPLOY_OFFSET = 7_919  # OEL deploy episodes of round r use run seed DEPLOY_OFFSET + r: unseen in extraction

# linear, so a share of a call starting at prompt a is called with prompt_seed(c, a); far above the
# spacing of the seeds above, so two calls' prompts never share a random stream
PROMPT_STRIDE = 2**32 + 15
HELDOUT_BASE = 1 << 62
_MAX_RUN_SEED, _MAX_STEP, _MAX_EPISODES = 1 << 28, 1 << 24, 1 << 10


def step_seed(seed: int, step: int) -> int:
    """Generation seed of training step `step` (also: off-policy generation, OEL deploy round)."""
    return seed * STEP_STRIDE + step


def extraction_heldout_seed(seed: int, step: int) -> int:
    """Held-out scoring after `step` items of the extraction with seed `seed`."""
    return seed * STEP_STRIDE + 2 * step


def extraction_attempt_seed(seed: int, step: int) -> int:
    """Solving the extraction stream's item `step` (0-based) without experience."""
    return seed * STEP_STRIDE + 2 * step + 1


def writer_seed(attempt_seed: int) -> int:
    """The writer's draw after the attempt generated with `attempt_seed`."""
    return attempt_seed + 1


def prompt_seed(call_seed: int, index: int) -> int:
    """The random stream of prompt `index` of a generate call with seed `call_seed`."""
    return call_seed + index * PROMPT_STRIDE


def eval_seed(seed: int) -> int:
    """Generation seed of every held-out evaluation of a run with seed `seed`."""
    return seed + EVAL_OFFSET


def deploy_run_seed(round_index: int) -> int:
    """Run seed whose step-1 training episodes OEL's deploy phase of round `round_index` plays."""
    return DEPLOY_OFFSET + round_index


def heldout_seeds(count: int) -> list[int]:
    """The fixed evaluation episodes (the same for every run, checkpoint and experience)."""
    return [HELDOUT_BASE + i for i in range(count)]


def training_seeds(run_seed: int, step: int, count: int) -> list[int]:
    """Episodes of training step `step` (>= 1) of the run with seed `run_seed`."""
    if not (0 <= run_seed < _MAX_RUN_SEED and 0 <= step < _MAX_STEP and 0 <= count <= _MAX_EPISODES):
        raise ValueError(f"training seeds need 0 <= seed < {_MAX_RUN_SEED}, 0 <= step < {_MAX_STEP} and at most "
                         f"{_MAX_EPISODES} episodes per step (got seed {run_seed}, step {step}, {count} episodes)")
    base = (run_seed << 34) | (step << 10)
    return [base | j for j in range(count)]
