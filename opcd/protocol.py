"""The data contracts that cross process boundaries (driver <-> Ray workers), one per phase.

Shapes: B = sequences in the batch, T = longest response, K = support size per token.
Responses are right-padded with the tokenizer's pad id; `response_mask` is True on every generated
token up to and including the EOS (the stop token is trained on, as in the reference). A multi-turn
game trajectory is one "response" holding the model's turns AND the environment's messages between
them: `response_mask` covers all of it (attention), `loss_mask` only the model's own tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opcd.data.partition import balanced_rows


@runtime_checkable
class RankShares(Protocol):
    """A result computed data parallel: each rank holds the rows of its share of the batch (the balanced
    partition a `RowShare` names), or rows r, r + N, ... of N when it was sent the whole batch.
    `WorkerGroup.gather` hands the ranks' shares (those that had rows, in rank order) to
    `from_rank_shares`, which puts the rows back in the batch's order."""

    @classmethod
    def from_rank_shares(cls, shares: list) -> "RankShares": ...


def interleave_rows(shares: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Rank r's rows [n_r, ...] are rows r, r + N, ... of the result [sum n_r, ...] (ranks that were each
    sent the whole batch and took every N-th row)."""
    if shares[0] is None:
        return None
    if len(shares) == 1:
        return shares[0]
    out = shares[0].new_empty((sum(s.shape[0] for s in shares), *shares[0].shape[1:]))
    for rank, share in enumerate(shares):
        out[rank::len(shares)] = share
    return out


@dataclass(frozen=True)
class RowShare:
    """Which rows of a batch a rank's share holds, and what the rank needs to run as many micro-batch
    passes as the busiest rank without seeing the others' rows: every row's length (one int a row).
    The rows are a balanced partition by length (opcd.data.partition), which every rank computes alike."""

    rank: int
    world_size: int
    lengths: list[int]  # prompt + response tokens of EVERY row of the whole batch
    pad_id: int = 0  # what fills the responses past their end (they travel packed, without it)

    @functools.cached_property
    def assignment(self) -> list[list[int]]:  # every rank's rows, in the batch's order
        return balanced_rows(self.lengths, self.world_size)

    @property
    def rows(self) -> list[int]:  # the batch's rows this share holds, in the batch's order
        return self.assignment[self.rank]


def share_lengths(prompts: list[list[int]], response_mask: torch.Tensor) -> list[int]:
    return [len(p) + int(n) for p, n in zip(prompts, response_mask.sum(-1))]


def _rows(tensor: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    return None if tensor is None else tensor[torch.tensor(rows, dtype=torch.long)]


def _one_token_like(tensor: torch.Tensor | None, fill=0, packed: bool = False) -> torch.Tensor | None:
    """The filler of a rank that holds no row, of `tensor`'s dtype and per-token shape: [1, 1, ...] for
    a [b, T, ...] tensor, [1, ...] for a packed [n, ...] one."""
    if tensor is None:
        return None
    shape = (1, *tensor.shape[1:]) if packed else (1, 1, *tensor.shape[2:])
    return torch.full(shape, fill, dtype=tensor.dtype)


def pack_tokens(tensor: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """[b, T, ...] -> [real tokens, ...]: the positions where `mask` [b, T] is True, row after row.
    Padding never travels; `unpack_tokens` with the same mask restores the padded layout."""
    return None if tensor is None else tensor[mask]


def unpack_tokens(packed: torch.Tensor | None, mask: torch.Tensor, fill=0) -> torch.Tensor | None:
    """Inverse of `pack_tokens`: [n, ...] -> [b, T, ...] with `fill` (0 / False) at the padding, which
    every consumer masks out."""
    if packed is None:
        return None
    out = packed.new_full((*mask.shape, *packed.shape[1:]), fill)
    out[mask] = packed
    return out


def _pad_value(response_ids: torch.Tensor, response_mask: torch.Tensor) -> int:
    padding = response_ids[~response_mask.bool()]
    return int(padding[0]) if padding.numel() else 0


def _compact_ids(ids: torch.Tensor | None) -> torch.Tensor | None:
    """Token ids cross processes as int32 (half of int64's bytes; vocabularies are far below 2**31)."""
    return None if ids is None else ids.to(torch.int32)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 48
    record_topk: int = 0  # also return the top-k token ids of the raw distribution at every step


@dataclass
class Generation:
    """Rollout output for a list of prompts (same order)."""

    response_ids: torch.Tensor  # [B, T] int64, right-padded
    response_mask: torch.Tensor  # [B, T] bool
    topk_ids: torch.Tensor | None = None  # [B, T, record_topk] int64: the policy's top-k at each position
    loss_mask: torch.Tensor | None = None  # [B, T] bool, the tokens trained on; None = response_mask
    pad_id: int | None = None  # set while packed (a rank's answer in transit): what fills the ids back

    @property
    def trained_mask(self) -> torch.Tensor:  # [B, T] bool
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def packed(self, pad_id: int) -> "Generation":
        """A rank's answer without the padding past each response's end: ids int32 [n], the top-k
        [n, k], the loss mask [n]; `response_mask` [B, T] stays, to put them back (`unpacked`). At
        B=128, T=16,384, record_topk=256 the padded int64 top-k alone is 4.3 GB."""
        mask = self.response_mask
        return Generation(pack_tokens(_compact_ids(self.response_ids), mask), mask,
                          pack_tokens(_compact_ids(self.topk_ids), mask), pack_tokens(self.loss_mask, mask), pad_id=pad_id)

    def unpacked(self) -> "Generation":
        """The padded layout of a packed answer: `pad_id` past each response's end in the ids, 0 in the
        top-k, False in the loss mask; ids int64. An unpacked generation as it is."""
        if self.pad_id is None:
            return self
        mask = self.response_mask
        topk = unpack_tokens(self.topk_ids, mask)
        return Generation(unpack_tokens(self.response_ids, mask, self.pad_id).long(), mask,
                          None if topk is None else topk.long(), unpack_tokens(self.loss_mask, mask, False))

    @property
    def response_lengths(self) -> torch.Tensor:  # [B], model tokens per sequence
        return self.trained_mask.sum(-1)

    def select(self, index: list[int] | torch.Tensor) -> "Generation":
        index = torch.as_tensor(index, dtype=torch.long)
        return Generation(self.response_ids[index], self.response_mask[index],
                          None if self.topk_ids is None else self.topk_ids[index],
                          None if self.loss_mask is None else self.loss_mask[index])


@dataclass(kw_only=True)
class TeacherScores:
    """Teacher log-probs (temperature-scaled, full-vocab normalised) at the support ids.

    The support is the one the driver asked for, or its union with the teacher's own top-k when
    merging was asked for (then `support_mask` is False on duplicate slots).

    A rank's answer to its share travels packed (`packed`): its token-level tensors hold the real
    tokens only, [n, K] and [n], with `token_mask` [b, T] saying where they go, and the support's ids
    only when merging changed them (int32); `from_rank_shares` puts the shares back as [B, T, K].
    """

    logprobs: torch.Tensor  # [B, T, K] float32 (packed: [n, K])
    entropy: torch.Tensor  # [B, T] float32, teacher entropy at each response position (packed: [n])
    support_ids: torch.Tensor | None  # [B, T, K] int64 (None from a rank that scored a support it was sent)
    support_mask: torch.Tensor | None = None  # [B, T, K] bool
    rows: list[int] | None = None  # a rank's answer to a share: the batch's rows it holds (else r, r + N, ...)
    token_mask: torch.Tensor | None = None  # a packed answer: where its tokens sit in its rows [b, T]

    _TOKEN_FIELDS = ("logprobs", "entropy", "support_ids", "support_mask")

    def packed(self, token_mask: torch.Tensor, rows: list[int]) -> "TeacherScores":
        """A rank's answer for the batch's `rows`, without the padding past each response's end."""
        return TeacherScores(logprobs=pack_tokens(self.logprobs, token_mask), entropy=pack_tokens(self.entropy, token_mask),
                             support_ids=pack_tokens(_compact_ids(self.support_ids), token_mask),
                             support_mask=pack_tokens(self.support_mask, token_mask), rows=rows, token_mask=token_mask)

    def unpacked(self) -> "TeacherScores":
        """The padded [b, T, ...] layout of a packed answer (0 / False at the padding; ids int64)."""
        if self.token_mask is None:
            return self
        ids = unpack_tokens(self.support_ids, self.token_mask)
        return TeacherScores(logprobs=unpack_tokens(self.logprobs, self.token_mask),
                             entropy=unpack_tokens(self.entropy, self.token_mask),
                             support_ids=None if ids is None else ids.long(),
                             support_mask=unpack_tokens(self.support_mask, self.token_mask), rows=self.rows)

    @classmethod
    def from_rank_shares(cls, shares: list["TeacherScores"]) -> "TeacherScores":
        names = cls._TOKEN_FIELDS
        if shares[0].rows is None:
            return cls(**{name: interleave_rows([getattr(s, name) for s in shares]) for name in names})
        shares = [s.unpacked() for s in shares]
        order = torch.tensor([row for s in shares for row in s.rows], dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return cls(**{name: None if getattr(shares[0], name) is None else
                      torch.cat([getattr(s, name) for s in shares])[inverse] for name in names})


@dataclass(frozen=True)
class Example:
    """One training prompt, tokenised for both sides (a dataset row, or a stored game state)."""

    row: dict
    student_prompt: list[int]  # chat-templated prompt without the context
    teacher_prompt: list[int]  # the same prompt with the context


@dataclass
class RolloutBatch:
    """What a rollout source hands the trainer for one step (opcd/domains/sources.py)."""

    student_prompts: list[list[int]]  # what the student was conditioned on (no context)
    teacher_prompts: list[list[int]]  # the same with the context
    generation: Generation  # the sequences both models score
    metrics: dict[str, float]  # task metrics of these rollouts (logged only)
    keys: list[str] | None = None  # one id per sequence ("row:17", "game:<seed>:turn:<i>"), for stored data
    teacher_scores: TeacherScores | None = None  # already known (off-policy shards with stored log-probs)


@dataclass
class UpdateBatch:
    """Everything the student needs for one optimiser step."""

    prompt_ids: list[list[int]]  # B student prompts (no context), token ids
    response_ids: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] bool
    # token-level tensors [B, T, K]; in a rank's share packed [real tokens, K] (`unpacked` pads them back)
    support_ids: torch.Tensor  # [B, T, K] int64, int32 in a share (K = 1 and the sampled token for k1/k2/k3/abs)
    support_mask: torch.Tensor | None  # [B, T, K] bool, False on duplicate slots of a merged support
    teacher_logprobs: torch.Tensor  # [B, T, K]
    num_tokens: int  # response tokens in the WHOLE step (normaliser of the token mean across micro-batches)
    num_sequences: int
    loss_mask: torch.Tensor | None = None  # [B, T] bool, tokens trained on (None = response_mask)
    share: RowShare | None = None  # None: the whole batch (each rank picks its rows); else one rank's rows

    @property
    def trained_mask(self) -> torch.Tensor:
        return self.response_mask if self.loss_mask is None else self.loss_mask

    def rank_shares(self, world_size: int) -> list["UpdateBatch"]:
        """One share per rank holding only that rank's rows (`WorkerGroup` puts each into the object
        store once and hands it to its rank alone). The step-wide normalisers stay the whole batch's."""
        out = []
        for share, rows, mask in _rank_rows(self.prompt_ids, self.response_ids, self.response_mask, world_size):
            out.append(UpdateBatch([self.prompt_ids[i] for i in rows],
                                   pack_tokens(_compact_ids(_rows(self.response_ids, rows)), mask), mask,
                                   pack_tokens(_compact_ids(_rows(self.support_ids, rows)), mask),
                                   pack_tokens(_rows(self.support_mask, rows), mask),
                                   pack_tokens(_rows(self.teacher_logprobs, rows), mask),
                                   self.num_tokens, self.num_sequences, _rows(self.loss_mask, rows), share))
        return out

    def unpacked(self) -> "UpdateBatch":
        """A rank's share (token-level tensors packed [n, K]) with those tensors padded back to [b, T, K]
        and the ids int64, as the loss takes them; the whole batch as it is."""
        if self.share is None:
            return self
        mask = self.response_mask
        response_ids = unpack_tokens(self.response_ids, mask, self.share.pad_id).long()
        return UpdateBatch(self.prompt_ids, response_ids, mask, unpack_tokens(self.support_ids, mask).long(),
                           unpack_tokens(self.support_mask, mask), unpack_tokens(self.teacher_logprobs, mask),
                           self.num_tokens, self.num_sequences, self.loss_mask, self.share)

    def one_token(self) -> "UpdateBatch":
        """A one-token sequence (a one-token prompt and response, id 0) for a rank whose share is empty
        to run its passes with (weight 0): FSDP2's collectives need every rank's forward and backward."""
        return UpdateBatch([[0]], _one_token_like(self.response_ids, 0, True), _one_token_like(self.response_mask, True),
                           _one_token_like(self.support_ids, 0, True), _one_token_like(self.support_mask, True, True),
                           _one_token_like(self.teacher_logprobs, 0, True), self.num_tokens, self.num_sequences,
                           _one_token_like(self.loss_mask, True), self.share)


@dataclass
class ScoreRequest:
    """What the teacher scores: B teacher prompts (with context), the responses [B, T], the support
    [B, T, K] (None = whole vocabulary) and how many of its own top-k to merge in (0 = none)."""

    prompts: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    support_ids: torch.Tensor | None
    merge_topk: int = 0
    share: RowShare | None = None  # as UpdateBatch.share

    def rank_shares(self, world_size: int) -> list["ScoreRequest"]:
        out = []
        for share, rows, mask in _rank_rows(self.prompts, self.response_ids, self.response_mask, world_size):
            out.append(ScoreRequest([self.prompts[i] for i in rows],
                                    pack_tokens(_compact_ids(_rows(self.response_ids, rows)), mask), mask,
                                    pack_tokens(_compact_ids(_rows(self.support_ids, rows)), mask),
                                    self.merge_topk, share))
        return out

    def unpacked(self) -> "ScoreRequest":
        """As `UpdateBatch.unpacked`."""
        if self.share is None:
            return self
        support = None if self.support_ids is None else unpack_tokens(self.support_ids, self.response_mask).long()
        response_ids = unpack_tokens(self.response_ids, self.response_mask, self.share.pad_id).long()
        return ScoreRequest(self.prompts, response_ids, self.response_mask, support, self.merge_topk, self.share)

    def one_token(self) -> "ScoreRequest":
        """As `UpdateBatch.one_token`, for the teacher's forward passes (collectives when sharded)."""
        return ScoreRequest([[0]], _one_token_like(self.response_ids, 0, True),
                            _one_token_like(self.response_mask, True),
                            _one_token_like(self.support_ids, 0, True), self.merge_topk, self.share)


def _rank_rows(prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, world_size: int):
    """For each rank: its `RowShare` (the balanced partition by length, the same on every rank), its
    rows and their response mask."""
    lengths = share_lengths(prompts, response_mask)
    pad_id = _pad_value(response_ids, response_mask)
    for rank in range(world_size):
        share = RowShare(rank, world_size, lengths, pad_id)
        yield share, share.rows, _rows(response_mask, share.rows)
