"""The frozen-model worker: a model that is never trained. It is the teacher that scores the
student's response tokens with the context in its prompt, and the model that generates wherever a
fixed model answers (the "teacher with context" baseline, extraction's solver and writer, OEL's
deployment, evaluation of checkpoints).

Scoring returns log-probs (softmax over the full vocabulary of logits / temperature) at the requested
support ids, optionally merged with the model's own top-k, and its entropy per token; how they are
computed is decided in opcd/workers/scoring.py, the same as for the student.

A teacher whose embedding has more rows than the student's (same tokenizer, padded differently:
Qwen2.5-7B 152,064 rows, Qwen2.5-3B 151,936) is given the student's row count (`WorkerSpec.vocab_rows`):
its softmax is taken over those rows only, i.e. renormalised over the ids the student can emit. The
extra rows are padding no tokenizer id maps to; without them both distributions live on the same ids,
so the full-vocabulary KL (loss.kl_topk <= 0) stays exact and the teacher's own top-k never names an id
the student lacks.
"""

from __future__ import annotations

import gc

import torch

from opcd.runtime import gpu_memory
from opcd.protocol import Generation, SamplingParams, ScoreRequest, TeacherScores
from opcd.rollout.engines import make_rollout
from opcd.workers import distributed as D
from opcd.workers.base import ModelWorker
from opcd.workers.scoring import Scorer
from opcd.workers.spec import WorkerSpec


class FrozenModelWorker(ModelWorker):
    def __init__(self, spec: WorkerSpec, rank: int = 0, world_size: int = 1, rendezvous=None):
        super().__init__(spec, rank, world_size, rendezvous)
        self.model = self.place(self.load_model(spec.dtype).eval())
        self.model.requires_grad_(False)
        # Generation-heavy stages (extraction, evaluation, off-policy data, the teacher's held-out
        # evaluation) run the configured engine, vLLM included; it is built on the first generate call,
        # so a teacher that only scores never holds one, and released when the generating is done.
        self.rollout = None
        self.scorer = Scorer.for_model(self.model, spec.loss.lm_head_chunk_size, spec.trainer.padding_free,
                                       spec.rollout.temperature, self.pad_id, self.device, vocab_rows=spec.vocab_rows)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
              support_ids: torch.Tensor | None, merge_topk: int = 0) -> TeacherScores | None:
        """prompts: B teacher prompts (with context); response_ids/mask [B, T]; support_ids [B, T, K]
        or None for the whole vocabulary; merge_topk > 0 adds the model's own top-k to the support.
        With several ranks, each handed the whole batch: this rank's rows r, r + N, ... (None when it has
        none), which `TeacherScores.from_rank_shares` puts back in order."""
        return self.score_request(ScoreRequest(prompts, response_ids, response_mask, support_ids, merge_topk))

    @torch.no_grad()
    def score_request(self, request: ScoreRequest) -> TeacherScores | None:
        """`score` of a request holding the whole batch or (request.share) this rank's rows only. The
        support's ids come back only when the teacher's top-k was merged into it (else the driver has
        them): `support_ids` None."""
        if not request.prompts:  # a rank with no row at all: its passes score a one-token sequence
            request = request.one_token()
        request = request.unpacked()
        prompts, response_ids, response_mask = request.prompts, request.response_ids, request.response_mask
        support_ids, merge_topk = request.support_ids, request.merge_topk
        parts = []
        # data parallel over ranks: every rank runs the same number of forward passes
        size, budget = self.spec.micro_batching(scoring_only=True)
        if request.share is not None:
            mine, steps = D.share_micro_batches(request.share, size, budget, padded=not self.scorer.packed)
        else:
            mine, steps = D.plan_rank_micro_batches(prompts, response_mask, self.rank, self.world_size, size, budget,
                                                    padded=not self.scorer.packed)
        for step in range(steps):
            rows = mine[step] if step < len(mine) else []
            # a padding pass when this rank has no rows left (row 0 of the batch or of its share)
            index = torch.tensor(rows or [0], dtype=torch.long)
            scores = self.scorer.score(self.model, [prompts[i] for i in index.tolist()], response_ids[index],
                                       response_mask[index], None if support_ids is None else support_ids[index],
                                       merge_topk)
            if rows:
                parts.append(scores)
        D.release(self.model)
        gpu_memory.release_cached()  # the scoring's activations: the student's update and engine come next
        self.memory.mark("score")
        if not parts:  # more ranks than sequences
            return None
        logprobs, entropy, ids, mask = (list(x) for x in zip(*parts))
        returned_ids = request.share is None or support_ids is None or merge_topk > 0
        scores = TeacherScores(logprobs=torch.cat(logprobs), entropy=torch.cat(entropy),
                               support_ids=torch.cat(ids) if returned_ids else None,
                               support_mask=None if mask[0] is None else torch.cat(mask))
        # a share's answer goes back without its padding: at B=128, T=16,384, K=256 the padded log-probs
        # alone are 2.15 GB against the real tokens' share of them
        return scores if request.share is None else scores.packed(response_mask, request.share.rows)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int,
                 reply: bool = True, packed: bool = False) -> Generation | None:
        """As StudentWorker.generate."""
        if self.rollout is None:
            self.rollout = make_rollout(self.spec, self.model, self.tokenizer, self.device)
        generation = self.rollout.generate(prompts, params, seed)
        if not reply:
            return None
        return generation.packed(self.pad_id) if packed else generation

    def release_rollout(self) -> None:
        """Drop an engine that holds its own copy of the weights (vLLM), with its KV cache: a teacher
        evaluated before training needs the memory for scoring afterwards."""
        if self.rollout is not None and not self.rollout.shares_module:
            self.rollout = None
            gc.collect()  # vLLM's engine holds reference cycles: free its memory now, not at some later collection
            gpu_memory.release_cached()
