"""Pure helpers that turn token-id lists into model inputs: padded batches, packed rows, micro-batch plans.

A padded training sequence is `[left-padded prompt | right-padded response]`, so every row's response starts
at the same column P (the prompt width) and the logits predicting response token t sit at column
P - 1 + t. Position ids count real tokens only, so left padding does not shift positions. A packed
row (`pack`) holds the same sequences back to back with no padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, P] int64, mask [B, P] bool; P = longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, W] int64, mask [B, W] bool; W = width or the longest sequence."""
    width = max((len(s) for s in sequences), default=0) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = True
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L] int64: 0, 1, 2... over real tokens; padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_response_inputs(prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
                           pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for scoring responses after prompts.

    prompts: B token lists; response_ids/mask: [B, T]. Returns input_ids/attention_mask/position_ids
    of shape [B, P + T]. With `logits_to_keep=T + 1`, logits[:, :-1] are the T next-token
    distributions of the response tokens.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.bool()], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(),
            "position_ids": position_ids(attention_mask)}


def strip_after_eos(rows: torch.Tensor, eos_ids: set[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ids [B, T] -> (ids with everything after the first EOS set to pad, mask incl. the EOS)."""
    is_eos = torch.zeros_like(rows, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= rows == eos
    # a position is kept if no EOS occurred strictly before it
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~eos_before
    return torch.where(mask, rows, torch.full_like(rows, pad_id)), mask


def plan_micro_batches(indices: list[int], lengths: list[int], size: int, token_budget: int = 0,
                       padded: bool = False) -> list[list[int]]:
    """Split `indices` (in order) into micro-batches: `size` sequences each, or, with `token_budget` > 0,
    as many consecutive sequences as fit in that many tokens (`lengths[i]`: prompt + response tokens
    of sequence i). A sequence longer than the budget is a micro-batch of its own.

    What a pass costs depends on how its rows reach the model: packed rows (padding-free) hold the
    sum of their lengths; `padded` rows are all as long as the longest, so a 16k-token row with three
    2k-token ones is 64k tokens, not 22k, and the budget must count it that way to bound memory."""
    if token_budget <= 0:
        return [indices[start:start + size] for start in range(0, len(indices), size)]
    groups, used, longest = [], 0, 0
    for i in indices:
        cost = max(longest, lengths[i]) * (len(groups[-1]) + 1) if padded and groups else \
            used + lengths[i]
        if not groups or cost > token_budget:
            groups.append([])
            used = longest = 0
        groups[-1].append(i)
        used += lengths[i]
        longest = max(longest, lengths[i])
    return groups


@dataclass(frozen=True)
class Packed:
    """Several sequences concatenated into one row, without padding.

    Position ids restart at 0 for every sequence; with no attention mask, transformers reads the
    sequence boundaries from them (a block-diagonal causal mask with SDPA/eager, variable-length
    kernels with flash-attention), so no token attends across sequences.
    """

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    response_index: torch.Tensor  # [B, T]: column of the hidden state that predicts response token t (0 if masked)


def pack(prompts: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor) -> Packed:
    """prompts: B non-empty token lists; response_ids/mask [B, T], right-padded -> one packed row of
    sum(len(prompt) + response length) tokens."""
    ids, positions = [], []
    index = torch.zeros(response_ids.shape, dtype=torch.long)
    start = 0
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"sequence {row} has an empty prompt: nothing predicts its first response token")
        n = int(response_mask[row].sum())
        if not bool(response_mask[row, :n].all()):
            raise ValueError(f"response {row} is not right-padded (its mask is not a prefix)")
        tokens = list(prompt) + response_ids[row, :n].tolist()
        ids.extend(tokens)
        positions.extend(range(len(tokens)))
        index[row, :n] = torch.arange(n) + start + len(prompt) - 1
        start += len(tokens)
    return Packed(torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long), index)
