"""`opcd offpolicy generate | train`: the off-policy baseline (method.md §6).

generate: the teacher (the initial model, or model.teacher_path) WITH the context answers the
training prompts (text games: plays the episodes with its experience), drawn step by step exactly as
an on-policy run would draw them. Each step is one shard (`opcd/runs/shards.py`): prompts without
and with the context, the teacher's tokens, and its top-k ids and log-probs at every position. An
interrupted generation resumes at the first missing step; a folder written with other settings is
refused.

train: the student (no context) learns from the shards, one shard per step (cycling when the run is
longer): forward KL over the teacher's top-k, KL(p_t || p_s), with the teacher's log-probs recomputed
by the teacher worker (default) or read from the shards (`offpolicy.teacher_logprobs=stored`); or
`offpolicy.objective=seqkd` (NLL of the teacher's tokens, no teacher needed). Shards must come from
the same tokenizer, task and data, and each shard's prompts must equal the dataset's.

    opcd offpolicy generate task=medmcqa trainer.exp_name=med-offp-data
    opcd offpolicy train task=medmcqa trainer.exp_name=med-offp offpolicy.save_dir=runs/med-offp-data/off_policy_data
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from opcd.config import DistillConfig
from opcd.errors import ConfigError, DataError
from opcd.pipelines.distill import run_distill
from opcd.pipelines.run_setup import Prepared, prepare
from opcd.pipelines.worker_setup import frozen_model_group, frozen_spec
from opcd.protocol import Generation, RolloutBatch, SamplingParams, ScoreRequest, TeacherScores
from opcd.data.seeds import step_seed
from opcd.runs.shards import Shard, ShardReader, ShardWriter, tokenizer_fingerprint
from opcd.domains.sources import PromptSource
from opcd.workers.frozen import FrozenModelWorker
from opcd.workers.group import init_ray

log = logging.getLogger("opcd.offpolicy")
MATCHED = ("tokenizer", "task", "train_data", "train_split", "enable_thinking", "game")  # must equal at train time


def shard_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.offpolicy.save_dir) if cfg.offpolicy.save_dir else cfg.run_dir / "off_policy_data"


def shard_header(cfg: DistillConfig, prepared: Prepared) -> dict:
    """The settings a shard folder is tied to (a resumed generation must use the same ones)."""
    context = hashlib.sha256("\0".join(prepared.context.texts).encode()).hexdigest()[:16]
    r = cfg.rollout
    return {"tokenizer": tokenizer_fingerprint(prepared.tokenizer), "task": cfg.task.name,
            "train_data": cfg.task.train_data, "train_split": cfg.task.train_split,
            "enable_thinking": cfg.task.enable_thinking,
            "game": prepared.domain.settings.get("game"),
            "context_sha256": context, "teacher": prepared.teacher_path, "topk": cfg.loss.kl_topk,
            "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "n": r.n,
                         "max_response_length": r.max_response_length},
            "batch_size": cfg.trainer.batch_size, "seed": cfg.trainer.seed}


def _check_topk(cfg: DistillConfig) -> None:
    if cfg.loss.kl_topk <= 0:
        raise ConfigError(f"config loss.kl_topk={cfg.loss.kl_topk}: expected an integer > 0 for the off-policy "
                          f"baseline (the teacher's top-k is stored per token)")


def run_offpolicy_generate(cfg: DistillConfig) -> dict:
    _check_topk(cfg)
    prepared = prepare(cfg)
    out = shard_dir(cfg)
    writer = ShardWriter(out, shard_header(cfg, prepared))
    done = writer.done_steps()
    total = cfg.trainer.total_training_steps
    if len(done & set(range(1, total + 1))) == total:
        log.info("%s: all %d steps already generated", out, total)
        return {"save_dir": str(out), "steps": total, "generated": 0}
    r = cfg.rollout
    params = SamplingParams(r.temperature, r.top_p, r.top_k, r.max_response_length, record_topk=cfg.loss.kl_topk)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    source, generated = prepared.source, 0
    # a padded teacher's own top-k (the shards' support) stays within the student's ids
    spec = frozen_spec(cfg, prepared.teacher_path, prepared.domain, prepared.student_vocab_rows)
    with frozen_model_group("teacher", spec, cfg.ray) as teacher:
        for step in range(1, total + 1):
            if step in done:
                source.skip(step)  # keep the data stream where an uninterrupted run would be
                continue
            batch = source.rollout(step, teacher.generate, params,
                                   step_seed(cfg.trainer.seed, step), teacher_side=True)
            writer.write(_shard(step, batch, _teacher_logprobs(teacher, batch)))
            generated += 1
            log.info("off-policy data: step %d/%d, %d sequences, %d tokens -> %s", step, total,
                     len(batch.student_prompts), int(batch.generation.trained_mask.sum()), out)
    return {"save_dir": str(out), "steps": total, "generated": generated}


def _teacher_logprobs(teacher, batch: RolloutBatch) -> TeacherScores:
    g = batch.generation
    scores = teacher.gather(FrozenModelWorker.score_request, ScoreRequest(batch.teacher_prompts, g.response_ids, g.response_mask,
                                                          g.topk_ids, 0))
    if scores.support_ids is None:  # the ranks leave the ids we sent out of their answer
        scores.support_ids = g.topk_ids
    return scores


def _shard(step: int, batch: RolloutBatch, scores: TeacherScores) -> Shard:
    g = batch.generation
    return Shard(step=step, keys=list(batch.keys), student_prompts=batch.student_prompts,
                 teacher_prompts=batch.teacher_prompts, response_ids=g.response_ids, response_mask=g.response_mask,
                 loss_mask=g.loss_mask, topk_ids=scores.support_ids, topk_logprobs=scores.logprobs)


class ShardSource:
    """Training batches read from shards: step s uses the s-th shard (cycling)."""

    def __init__(self, reader: ShardReader, stored_logprobs: bool, prompt_source: PromptSource | None):
        self.reader = reader
        self.steps = reader.steps
        self.stored_logprobs = stored_logprobs
        self.prompt_source = prompt_source  # dataset tasks: each shard's prompts are checked against it

    def rollout(self, step: int, generate, params, seed: int, teacher_side: bool = False) -> RolloutBatch:
        shard = self.reader.read(self.steps[(step - 1) % len(self.steps)])
        if self.prompt_source is not None:
            self._check_prompts(shard)
        generation = Generation(shard.response_ids, shard.response_mask, shard.topk_ids, shard.loss_mask)
        scores = None
        if self.stored_logprobs:
            scores = TeacherScores(logprobs=shard.topk_logprobs, entropy=torch.zeros(shard.response_mask.shape),
                                   support_ids=shard.topk_ids)
        return RolloutBatch(shard.student_prompts, shard.teacher_prompts, generation, {}, shard.keys, scores)

    def _check_prompts(self, shard: Shard) -> None:
        examples = self.prompt_source.examples
        expected = []
        for key in shard.keys:
            index = int(key.split(":", 1)[1]) if key.startswith("row:") else -1
            if not 0 <= index < len(examples):
                raise DataError(f"{self.reader.folder}: shard step {shard.step} names {key!r}, which the dataset "
                                f"({len(examples)} usable rows) does not have")
            expected.append(examples[index].student_prompt)
        for i, (stored, now) in enumerate(zip(shard.student_prompts, expected)):
            if stored != now:
                raise DataError(f"{self.reader.folder}: shard step {shard.step} does not match the dataset "
                                f"(sequence {i}, {shard.keys[i]}: the stored prompt differs from the dataset's)")

    def skip(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_offpolicy_train(cfg: DistillConfig) -> dict:
    _check_topk(cfg)
    prepared = prepare(cfg)
    reader = ShardReader(shard_dir(cfg))
    header = shard_header(cfg, prepared)
    reader.check_header(header, list(MATCHED))
    if not reader.steps:
        raise DataError(f"{reader.folder}: the manifest lists no shards; run 'opcd offpolicy generate' first")
    if len(reader.steps) < cfg.trainer.total_training_steps:
        log.warning("%s holds %d steps of data for %d training steps: the shards are reused in order",
                    reader.folder, len(reader.steps), cfg.trainer.total_training_steps)
    stored = cfg.offpolicy.teacher_logprobs == "stored"
    prompts = prepared.source if isinstance(prepared.source, PromptSource) else None
    source = ShardSource(reader, stored, prompts)
    seqkd = cfg.offpolicy.objective == "seqkd"
    return run_distill(cfg, prepared, source=source, objective=cfg.offpolicy.objective,
                       teacher_scores_needed=not (seqkd or stored))

