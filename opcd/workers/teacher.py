"""The teacher worker: a frozen model that scores the student's response tokens with the context in
its prompt. It returns log-probs (softmax over the full vocabulary of logits / temperature) at the
requested support ids, optionally merged with its own top-k, and its entropy per token. It can also
generate, for the "teacher with context" evaluation baseline.

A teacher whose embedding has more rows than the student's (same tokenizer, padded differently:
Qwen2.5-7B 152,064 rows, Qwen2.5-3B 151,936) is given the student's row count as `vocab_size`: its
softmax is taken over those rows only, i.e. renormalised over the ids the student can emit. The extra
rows are padding no tokenizer id maps to; without them both distributions live on the same ids, so
the full-vocabulary KL (loss.kl_topk <= 0) stays exact and the teacher's own top-k never names an id
the student lacks.
"""

from __future__ import annotations

import math
import os

import torch

from opcd import gpu_memory, lm_head, loss, loss_chunked
from opcd.batching import prompt_response_inputs
from opcd.models import compute_device, load_causal_lm, load_tokenizer
from opcd.protocol import Generation, SamplingParams, TeacherScores
from opcd.rollout.hf import HFRollout
from opcd.workers import distributed as D


class TeacherWorker:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 attn_implementation: str | None = None, temperature: float = 1.0, micro_batch_size: int = 8,
                 num_threads: int = 0, cpu_offload: bool = False, lm_head_chunk_size: int = 512,
                 padding_free: bool | None = None, micro_batch_tokens: int = 0, vocab_size: int | None = None,
                 rollout_backend: str = "hf", vllm: dict | None = None, rank: int = 0, world_size: int = 1,
                 rendezvous=None):
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            D.init_process_group(rendezvous, rank, world_size)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, attn_implementation).eval()
        self.model.requires_grad_(False)
        self.device = compute_device()
        if world_size > 1:  # fully_shard moves the shards to the device (or keeps them on CPU with offload)
            D.shard(self.model, cpu_offload=cpu_offload)
        else:
            self.model.to(self.device)
        self.rollout = HFRollout(self.model, self.tokenizer)
        if rollout_backend == "vllm":  # generation-heavy stages (extraction, evaluation, off-policy data)
            from opcd.rollout.vllm import VLLMRollout

            self.rollout = VLLMRollout(model_path, self.tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
                                       **(vllm or {}))
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.pad_id = self.tokenizer.pad_token_id
        # chunk > 0: hidden states, the lm_head applied a chunk of tokens at a time (no [tokens, vocab] logits)
        self.lm_head_chunk_size, self.padding_free = lm_head.head_settings(self.model, lm_head_chunk_size,
                                                                           padding_free)
        self.micro_batch_tokens = micro_batch_tokens
        rows = self.model.get_output_embeddings().weight.shape[0]
        if vocab_size is not None and not 0 < vocab_size <= rows:
            raise ValueError(f"vocab_size {vocab_size} must be in [1, {rows}] (the rows of {model_path}'s lm_head)")
        self.vocab_size = vocab_size or rows  # scoring softmax over ids [0, vocab_size)

    def gpu_memory(self) -> dict[str, float]:
        """Peak GPU memory since the previous call (opcd/gpu_memory.py); {} on CPU."""
        return gpu_memory.read_and_reset()

    @torch.no_grad()
    def score(self, prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
              support_ids: torch.Tensor | None, merge_topk: int = 0) -> TeacherScores:
        """prompts: B teacher prompts (with context); response_ids/mask [B, T]; support_ids [B, T, K]
        or None for the whole vocabulary; merge_topk > 0 adds the teacher's own top-k to the support."""
        parts = []
        # data parallel over ranks: rank r scores sequences r, r + N, ... (the group interleaves the
        # parts back); every rank runs the same number of forward passes
        mine, steps = D.plan_rank_micro_batches(prompts, response_mask, self.rank, self.world_size,
                                                self.micro_batch_size, self.micro_batch_tokens)
        for step in range(steps):
            rows = mine[step] if step < len(mine) else []
            index = torch.tensor(rows or [0], dtype=torch.long)
            rows_prompts, rows_ids, rows_mask = [prompts[i] for i in index.tolist()], response_ids[index], response_mask[index]
            rows_support = None if support_ids is None else support_ids[index]
            if self.lm_head_chunk_size:
                hidden = lm_head.response_hidden_states(self.model, rows_prompts, rows_ids, rows_mask, self.pad_id,
                                                        self.padding_free, self.device)
                if rows:
                    parts.append(self._chunked_scores(hidden, rows_mask, rows_support, merge_topk))
                continue
            inputs = prompt_response_inputs(rows_prompts, rows_ids, rows_mask, self.pad_id)
            width = response_ids.shape[1]
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}, logits_to_keep=width + 1,
                                use_cache=False).logits[:, :-1, :self.vocab_size].float()
            if not rows:
                continue  # a padding pass: this rank had no sequences left
            ids, mask = self._support(logits, None if rows_support is None else rows_support.to(self.device),
                                      merge_topk)
            parts.append(tuple(None if t is None else t.cpu() for t in (
                loss.gather_logprobs(logits, ids, self.temperature), loss.entropy(logits, self.temperature), ids,
                mask)))
        D.release(self.model)
        if not parts:  # more ranks than sequences
            return None
        logprobs, entropy, ids, mask = (list(x) for x in zip(*parts))
        return TeacherScores(torch.cat(logprobs), torch.cat(entropy), torch.cat(ids),
                             None if mask[0] is None else torch.cat(mask))

    def _chunked_scores(self, hidden: torch.Tensor, response_mask: torch.Tensor, support_ids: torch.Tensor | None,
                        merge_topk: int):
        """hidden [b, T, H] -> (log-probs [b, T, K'], entropy [b, T], ids [b, T, K'], mask or None), the
        lm_head applied at the response tokens only. Past a response's end: the uniform distribution's
        log-prob (finite, never used) and entropy 0."""
        head = self.model.get_output_embeddings()
        vocab = self.vocab_size
        weight, bias = head.weight, head.bias
        if vocab < weight.shape[0]:  # a padded teacher: only the student's rows (module docstring)
            weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
        real = response_mask.bool()
        if support_ids is None:  # the whole vocabulary: exact KL
            ids = torch.arange(vocab).expand(*response_mask.shape, vocab)
        else:
            ids = support_ids
        logprobs, entropy, top = (None if t is None else t.cpu() for t in loss_chunked.support_logprobs_no_grad(
            hidden[real.to(hidden.device)], weight, ids[real].to(hidden.device), self.temperature,
            self.lm_head_chunk_size, bias, topk=merge_topk if support_ids is not None else 0))
        mask = None
        if top is not None:
            all_top = torch.zeros(*response_mask.shape, merge_topk, dtype=torch.long)
            all_top[real] = top
            ids, mask = loss.merge_support(ids, all_top)
        out_logprobs = torch.full((*response_mask.shape, logprobs.shape[-1]), -math.log(vocab), dtype=logprobs.dtype)
        out_logprobs[real] = logprobs
        out_entropy = torch.zeros(response_mask.shape, dtype=entropy.dtype)
        out_entropy[real] = entropy
        return out_logprobs, out_entropy, ids, mask

    @staticmethod
    def _support(logits: torch.Tensor, support_ids: torch.Tensor | None, merge_topk: int):
        if support_ids is None:  # the whole vocabulary: exact KL
            vocab = logits.shape[-1]
            return torch.arange(vocab, device=logits.device).expand(*logits.shape[:-1], vocab), None
        if merge_topk > 0:
            return loss.merge_support(support_ids, loss.topk_ids(logits, merge_topk))
        return support_ids, None

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int) -> Generation:
        return self.rollout.generate(prompts, params, seed)
