"""How a model's log-probs at a support are computed: the one place that chooses between the
chunked lm_head and full logits, and between packed and padded rows. The student's update
(`Scorer.loss`, with gradients) and every frozen model's scoring (`Scorer.score`, no graph) go
through it, so both sides of the KL are always computed the same way.

    full logits    model(...).logits [b, T, V], then opcd.loss.kl (gather, entropy, aggregate)
    chunked head   last hidden states (opcd/workers/lm_head.py) at the response tokens only, the
                   lm_head a chunk of tokens at a time (opcd/loss/chunked.py): no [tokens, vocab]
                   logits; the student's loss gradient is computed on the way (fused)
    packed rows    (chunked head only) one padding-free row per micro-batch, else left-padded prompt
                   + right-padded response

The choice is made once per model (`Scorer.for_model`): chunks only where the logits are a plain
projection of the hidden states, packing only where it pays unless asked for.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opcd.loss import chunked, kl
from opcd.data.batching import prompt_response_inputs
from opcd.workers import lm_head

# (log-probs [b, T, K'], entropy [b, T], support ids [b, T, K'], support mask [b, T, K'] or None), on CPU
Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch of the student's update: b rows of the step's batch, the response tensors on
    the CPU, the token-level ones already on the scorer's device."""

    prompts: list[list[int]]  # b student prompts (no context)
    response_ids: torch.Tensor  # [b, T] int64
    response_mask: torch.Tensor  # [b, T] bool
    trained: torch.Tensor  # [b, T] bool, the tokens the loss counts
    support_ids: torch.Tensor  # [b, T, K] int64
    teacher_logprobs: torch.Tensor  # [b, T, K]
    support_mask: torch.Tensor | None = None  # [b, T, K] bool, False on duplicate slots of a merged support


@dataclass(frozen=True)
class Scorer:
    chunk_size: int  # tokens per lm_head chunk; 0 = full logits
    packed: bool  # padding-free rows (chunked head only)
    temperature: float
    pad_id: int
    device: torch.device  # where the model computes; inputs are moved there
    autocast: Callable = contextlib.nullcontext  # the student's compute dtype over fp32 master weights (GPU)
    vocab_rows: int | None = None  # softmax over the first rows only (a padded teacher: opcd/workers/frozen.py)

    @classmethod
    def for_model(cls, model, chunk_size: int, padding_free: bool | None, temperature: float, pad_id: int,
                  device: torch.device, autocast: Callable = contextlib.nullcontext,
                  vocab_rows: int | None = None) -> "Scorer":
        chunk_size, packed = lm_head.head_settings(model, chunk_size, padding_free, device)
        rows = model.get_output_embeddings().weight.shape[0]
        if vocab_rows is not None and not 0 < vocab_rows <= rows:
            raise ValueError(f"vocab_rows {vocab_rows} must be in [1, {rows}] (the rows of the model's lm_head)")
        return cls(chunk_size, packed, temperature, pad_id, torch.device(device), autocast,
                   None if vocab_rows == rows else vocab_rows)

    # -- the student: loss with gradients ------------------------------------------------------------
    def loss(self, model, inputs: "LossInputs", *, token_loss: Callable, aggregation: str,
             normalizer: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's share of the step's loss (a 0-dim tensor with a graph to the model) and the
        sums of its per-token statistics over the trained tokens (entropy, student/teacher support mass).

        token_loss(student_logprobs, teacher_logprobs, mask) -> [b, T]; `aggregation` token_mean or
        seq_mean; `normalizer`: the whole step's tokens (token_mean) or sequences (seq_mean)."""
        if self.chunk_size:
            return self._chunked_loss(model, inputs, token_loss, aggregation, normalizer)
        with self.autocast():
            logits = self._logits(model, inputs.prompts, inputs.response_ids, inputs.response_mask)  # [b, T, V]
        student_logprobs = kl.gather_logprobs(logits, inputs.support_ids, self.temperature)  # [b, T, K]
        per_token = token_loss(student_logprobs, inputs.teacher_logprobs, inputs.support_mask)  # [b, T]
        mb_loss = kl.aggregate(per_token, inputs.trained, aggregation, normalizer=normalizer)
        with torch.no_grad():
            mask = inputs.trained.float()
            stats = {"entropy": (kl.entropy(logits, self.temperature) * mask).sum().item(),
                     "student_mass": (kl.support_mass(student_logprobs, inputs.support_mask) * mask).sum().item(),
                     "teacher_mass": (kl.support_mass(inputs.teacher_logprobs, inputs.support_mask) * mask).sum().item()}
        return mb_loss, stats

    def _chunked_loss(self, model, inputs: "LossInputs", token_loss: Callable, aggregation: str, normalizer: int):
        """The same loss and statistics from hidden states, only at the trained tokens, the gradient of
        the lm_head computed chunk by chunk on the way (chunked.fused_support_loss)."""
        with self.autocast():
            hidden = lm_head.response_hidden_states(model, inputs.prompts, inputs.response_ids, inputs.response_mask,
                                                    self.pad_id, self.packed, self.device)  # [b, T, H]
        head = model.get_output_embeddings()
        keep = inputs.trained.bool()
        weights = kl.aggregation_weights(inputs.trained, aggregation, normalizer)[keep]
        mask = None if inputs.support_mask is None else inputs.support_mask[keep]
        teacher_logprobs = inputs.teacher_logprobs[keep]
        mb_loss, student_logprobs, entropy = chunked.fused_support_loss(
            hidden[keep], head.weight, inputs.support_ids[keep], teacher_logprobs, token_loss, weights,
            self.temperature, self.chunk_size, head.bias, mask)
        stats = {"entropy": entropy.sum().item(),
                 "student_mass": kl.support_mass(student_logprobs, mask).sum().item(),
                 "teacher_mass": kl.support_mass(teacher_logprobs, mask).sum().item()}
        return mb_loss, stats

    # -- a frozen model: scores, no graph -----------------------------------------------------------
    @torch.no_grad()
    def score(self, model, prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
              support_ids: torch.Tensor | None, merge_topk: int) -> Scores:
        """Log-probs at `support_ids` [b, T, K] (CPU; None = the whole vocabulary), merged with the model's
        own top-`merge_topk` when > 0, and the entropy, at every response position; all on CPU."""
        if self.chunk_size:
            hidden = lm_head.response_hidden_states(model, prompts, response_ids, response_mask, self.pad_id,
                                                    self.packed, self.device)
            return self._chunked_scores(model, hidden, response_mask, support_ids, merge_topk)
        logits = self._logits(model, prompts, response_ids, response_mask)
        ids, mask = _support(logits, None if support_ids is None else support_ids.to(self.device), merge_topk)
        return tuple(None if t is None else t.cpu() for t in (
            kl.gather_logprobs(logits, ids, self.temperature), kl.entropy(logits, self.temperature), ids, mask))

    def _chunked_scores(self, model, hidden: torch.Tensor, response_mask: torch.Tensor,
                        support_ids: torch.Tensor | None, merge_topk: int) -> Scores:
        """hidden [b, T, H] -> Scores, the lm_head applied at the response tokens only. Past a response's
        end: the uniform distribution's log-prob (finite, never used) and entropy 0."""
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if self.vocab_rows is not None:  # a padded teacher: only the student's rows
            weight, bias = weight[:self.vocab_rows], None if bias is None else bias[:self.vocab_rows]
        vocab = weight.shape[0]
        real = response_mask.bool()
        if support_ids is None:  # the whole vocabulary: exact KL
            ids = torch.arange(vocab).expand(*response_mask.shape, vocab)
        else:
            ids = support_ids
        logprobs, entropy, top = (None if t is None else t.cpu() for t in chunked.support_logprobs_no_grad(
            hidden[real.to(hidden.device)], weight, ids[real].to(hidden.device), self.temperature,
            self.chunk_size, bias, topk=merge_topk if support_ids is not None else 0))
        mask = None
        if top is not None:
            all_top = torch.zeros(*response_mask.shape, merge_topk, dtype=torch.long)
            all_top[real] = top
            ids, mask = kl.merge_support(ids, all_top)
        out_logprobs = torch.full((*response_mask.shape, logprobs.shape[-1]), -math.log(vocab), dtype=logprobs.dtype)
        out_logprobs[real] = logprobs
        out_entropy = torch.zeros(response_mask.shape, dtype=entropy.dtype)
        out_entropy[real] = entropy
        return out_logprobs, out_entropy, ids, mask

    def _logits(self, model, prompts, response_ids, response_mask) -> torch.Tensor:
        """Full float32 logits predicting each response token: [b, T, V] on `device`."""
        inputs = prompt_response_inputs(prompts, response_ids, response_mask, self.pad_id)
        width = response_ids.shape[1]
        logits = model(**{k: v.to(self.device) for k, v in inputs.items()}, logits_to_keep=width + 1,
                       use_cache=False).logits[:, :-1]
        return (logits if self.vocab_rows is None else logits[..., :self.vocab_rows]).float()


def _support(logits: torch.Tensor, support_ids: torch.Tensor | None, merge_topk: int):
    if support_ids is None:  # the whole vocabulary: exact KL
        vocab = logits.shape[-1]
        return torch.arange(vocab, device=logits.device).expand(*logits.shape[:-1], vocab), None
    if merge_topk > 0:
        return kl.merge_support(support_ids, kl.topk_ids(logits, merge_topk))
    return support_ids, None
