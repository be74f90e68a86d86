"""Pure helpers that turn token-id lists into padded model inputs.

A training sequence is `[left-padded prompt | right-padded response]`, so every row's response starts
at the same column P (the prompt width) and the logits predicting response token t sit at column
P - 1 + t. Position ids count real tokens only, so left padding does not shift positions.
"""

from __future__ import annotations

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


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
