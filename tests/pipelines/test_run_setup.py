"""opcd/pipelines/{run,domain,worker}_setup.py: the one switch between datasets and
games, what each pipeline loads, and the settings derived from the domain (no Ray, no model: the real SmolLM2 tokenizer only)."""

from __future__ import annotations

import json

from opcd.config import load_config
from opcd.domains.dataset import DatasetDomain
from opcd.domains.game import GameDomain
from opcd.pipelines.domain_setup import load_run_context, make_domain
from opcd.pipelines.worker_setup import student_context
from opcd.workers.spec import WorkerSpec
from opcd.domains.sources import GameSource, PromptSource


def _domain(tokenizer, purpose: str, *overrides: str):
    cfg = load_config(list(overrides))
    context = load_run_context(cfg.task, tokenizer) if purpose != "extract" else None
    return cfg, make_domain(cfg, tokenizer, context, purpose)


def test_a_dataset_loads_what_each_pipeline_needs(smollm2_tokenizer):
    _, train = _domain(smollm2_tokenizer, "train", "trainer.eval_limit=5")
    assert isinstance(train, DatasetDomain) and isinstance(train.training_source(), PromptSource)
    assert train.num_eval_items == 5 and len(train.train_examples) > 5 and train.settings == {}
    _, evaluation = _domain(smollm2_tokenizer, "evaluate", "trainer.eval_limit=5", "evaluate.limit=3")
    assert evaluation.num_eval_items == 3 and evaluation.train_examples == []
    _, extraction = _domain(smollm2_tokenizer, "extract", "extract.heldout_size=4")
    assert len(extraction.eval_rows) == 4 and extraction.eval_examples == [] and extraction.train_rows
    stream = extraction.extraction_stream(seed=1, count=3)
    assert stream == extraction.extraction_stream(seed=1, count=3) != extraction.extraction_stream(seed=2, count=3)


def test_a_game_trains_on_new_episodes_or_on_stored_states(smollm2_tokenizer, tmp_path):
    cfg, game = _domain(smollm2_tokenizer, "train", "task=textgame", "game.eval_episodes=4")
    assert isinstance(game, GameDomain) and isinstance(game.training_source(), GameSource)
    assert game.num_eval_items == 4 and game.settings["game"]["name"] == cfg.game.name
    state = {"observation": "board", "remaining": 3, "history": []}
    (tmp_path / "states.jsonl").write_text(json.dumps(state) + "\n")
    states = ("task=textgame", f"game.states_path={tmp_path / 'states.jsonl'}")
    _, consolidation = _domain(smollm2_tokenizer, "train", *states)
    assert isinstance(consolidation.training_source(), PromptSource) and len(consolidation.states) == 1
    _, evaluation = _domain(smollm2_tokenizer, "evaluate", *states)  # evaluation plays held-out episodes only
    assert evaluation.states is None


def test_vllm_context_covers_a_whole_trajectory(smollm2_tokenizer):
    """The rollout length comes from the domain: a trajectory holds every move and every answer."""
    common = ("rollout.backend=vllm", "task.max_prompt_length=100", "rollout.max_response_length=10")
    cfg, dataset = _domain(smollm2_tokenizer, "train", *common)
    assert student_context(dataset, cfg.task, cfg.rollout) == 110
    assert WorkerSpec.from_config(cfg, "m", max_model_len=110).max_model_len == 110
    cfg, turns = _domain(smollm2_tokenizer, "train", *common, "task=textgame", "game.max_steps=4")
    assert student_context(turns, cfg.task, cfg.rollout) == 110
    cfg, trajectory = _domain(smollm2_tokenizer, "train", *common, "task=textgame", "game.max_steps=4",
                              "game.mode=trajectory")
    assert student_context(trajectory, cfg.task, cfg.rollout) == 100 + 4 * (10 + 256)
