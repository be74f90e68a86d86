"""The teacher worker: a frozen model that scores the student's response tokens with the context in
its prompt. It returns log-probs (softmax over the full vocabulary of logits / temperature) at the
requested support ids, optionally merged with its own top-k, and its entropy per token. It can also
generate, for the "teacher with context" evaluation baseline.
"""

from __future__ import annotations

import os

import torch

from opcd import lm_head, loss, loss_chunked
from opcd.batching import prompt_response_inputs
from opcd.models import load_causal_lm, load_tokenizer
from opcd.protocol import Generation, SamplingParams, TeacherScores
from opcd.rollout.hf import HFRollout
from opcd.workers import distributed as D


class TeacherWorker:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 attn_implementation: str | None = None, temperature: float = 1.0, micro_batch_size: int = 8,
                 num_threads: int = 0, cpu_offload: bool = False, lm_head_chunk_size: int = 512, rank: int = 0,
                 world_size: int = 1, rendezvous=None):
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            D.init_process_group(rendezvous, rank, world_size)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, attn_implementation).eval()
        self.model.requires_grad_(False)
        if world_size > 1:
            D.shard(self.model, cpu_offload=cpu_offload)
        self.rollout = HFRollout(self.model, self.tokenizer)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.pad_id = self.tokenizer.pad_token_id
        # > 0: score from hidden states, the lm_head a chunk of tokens at a time (no [tokens, vocab] logits)
        self.lm_head_chunk_size = lm_head_chunk_size if lm_head_chunk_size > 0 and lm_head.is_plain_head(self.model) else 0

    @torch.no_grad()
    def score(self, prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
              support_ids: torch.Tensor | None, merge_topk: int = 0) -> TeacherScores:
        """prompts: B teacher prompts (with context); response_ids/mask [B, T]; support_ids [B, T, K]
        or None for the whole vocabulary; merge_topk > 0 adds the teacher's own top-k to the support."""
        parts = []
        # data parallel over ranks: rank r scores sequences r, r + N, ... (the group interleaves the
        # parts back); every rank runs the same number of forward passes
        mine = D.my_indices(len(prompts), self.rank, self.world_size)
        steps = D.micro_batch_count(len(prompts), self.world_size, self.micro_batch_size)
        for step in range(steps):
            rows = mine[step * self.micro_batch_size:(step + 1) * self.micro_batch_size]
            index = torch.tensor(rows or [0], dtype=torch.long)
            inputs = prompt_response_inputs([prompts[i] for i in index.tolist()], response_ids[index],
                                            response_mask[index], self.pad_id)
            width = response_ids.shape[1]
            rows_support = None if support_ids is None else support_ids[index]
            if self.lm_head_chunk_size:
                with lm_head.hidden_states_out(self.model) as head:
                    hidden = self.model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
                if rows:
                    parts.append(self._chunked_scores(hidden, head, rows_support, merge_topk))
                continue
            logits = self.model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1].float()
            if not rows:
                continue  # a padding pass: this rank had no sequences left
            ids, mask = self._support(logits, rows_support, merge_topk)
            parts.append((loss.gather_logprobs(logits, ids, self.temperature),
                          loss.entropy(logits, self.temperature), ids, mask))
        D.release(self.model)
        if not parts:  # more ranks than sequences
            return None
        logprobs, entropy, ids, mask = (list(x) for x in zip(*parts))
        return TeacherScores(torch.cat(logprobs), torch.cat(entropy), torch.cat(ids),
                             None if mask[0] is None else torch.cat(mask))

    def _chunked_scores(self, hidden: torch.Tensor, head, support_ids: torch.Tensor | None, merge_topk: int):
        """hidden [b, T, H] -> (log-probs [b, T, K'], entropy [b, T], ids [b, T, K'], mask or None)."""
        b, t, _ = hidden.shape
        flat = hidden.reshape(b * t, -1)
        if support_ids is None:  # the whole vocabulary: exact KL
            ids = torch.arange(head.weight.shape[0]).expand(b * t, -1)
        else:
            ids = support_ids.reshape(b * t, -1)
        logprobs, entropy, top = loss_chunked.support_logprobs_no_grad(
            flat, head.weight, ids, self.temperature, self.lm_head_chunk_size, head.bias,
            topk=merge_topk if support_ids is not None else 0)
        mask = None
        if top is not None:
            ids, mask = loss.merge_support(ids, top)
            mask = mask.reshape(b, t, -1)
        return logprobs.reshape(b, t, -1), entropy.reshape(b, t), ids.reshape(b, t, -1), mask

    @staticmethod
    def _support(logits: torch.Tensor, support_ids: torch.Tensor | None, merge_topk: int):
        if support_ids is None:  # the whole vocabulary: exact KL
            vocab = logits.shape[-1]
            return torch.arange(vocab).expand(*logits.shape[:-1], vocab), None
        if merge_topk > 0:
            return loss.merge_support(support_ids, loss.topk_ids(logits, merge_topk))
        return support_ids, None

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        return self.rollout.generate(prompts, params, seed)
