"""A causal LM's last hidden states instead of its logits, so the losses can apply the lm_head a
chunk of tokens at a time (opcd/loss/chunked.py) and never hold [tokens, vocab] logits.

The model still runs its own forward (FSDP2's hooks gather and release the root's parameters as
usual); only the output projection is bypassed for the duration of the call. Whether that is exact
for a given architecture is checked numerically once (`is_plain_head`): models that scale or
soft-cap their logits after the projection keep the full-logits path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from opcd.data.batching import pack, prompt_response_inputs
from opcd.workers.distributed import release


@contextmanager
def hidden_states_out(model):
    """Inside the block `model(...).logits` are the final hidden states [B, L, H]; yields the head."""
    head = model.get_output_embeddings()
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield head
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@torch.no_grad()
def is_plain_head(model, device: torch.device | str | None = None) -> bool:
    """True when `model(ids).logits == hidden @ W.T + b` on a short input (a forward of 4 tokens) run on
    `device` (the worker's compute device; default: where the model's parameters are).

    With several FSDP ranks every rank must call this (it runs the model)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([[1, 2, 3, 4]], device=device or head.weight.device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        with hidden_states_out(model):
            hidden = model(input_ids=ids, use_cache=False).logits
        if hidden.shape[-1] != head.in_features:
            return False
        projected = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    finally:
        model.train(was_training)
        release(model)  # FSDP2 keeps the root gathered after a forward
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 5e-2
    return projected.shape == logits.shape and torch.allclose(projected, logits, rtol=tolerance, atol=tolerance)


def response_hidden_states(model, prompts: list[list[int]], response_ids: torch.Tensor,
                           response_mask: torch.Tensor, pad_id: int, packed: bool,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Final hidden states that predict each response token: [B, T, H] (rows past a response's end
    hold whatever; callers mask them). `packed`: one padding-free row (opcd.data.batching.pack), else a
    left-padded prompt + right-padded response batch. The inputs go to `device` (the worker's compute
    device), and so does the result."""
    width = response_ids.shape[1]
    with hidden_states_out(model):
        if packed:
            row = pack(prompts, response_ids, response_mask)
            hidden = model(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                           use_cache=False).logits[0]
            return hidden[row.response_index.to(device)]
        inputs = prompt_response_inputs(prompts, response_ids, response_mask, pad_id)
        return model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=width + 1,
                     use_cache=False).logits[:, :-1]


def packing_pays(model) -> bool:
    """Whether padding-free packed rows are the faster layout for this model: with flash-attention
    (variable-length kernels) they are; with SDPA or eager attention the packed row gets a
    [tokens, tokens] block-diagonal mask, and on CPU (SmolLM2-135M, 8 sequences of ~70 tokens)
    the update measured 3.89 s packed against 3.33 s padded."""
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def head_settings(model, chunk_size: int, padding_free: bool | None,
                  device: torch.device | str | None = None) -> tuple[int, bool]:
    """(lm_head chunk size, packed rows) a worker uses: chunks only where the head is a plain projection
    (else 0: full logits), packing only on that hidden-state path and, when not set, only where it pays."""
    chunk_size = chunk_size if chunk_size > 0 and is_plain_head(model, device) else 0
    if padding_free is None:
        padding_free = packing_pays(model)
    return chunk_size, bool(padding_free and chunk_size > 0)
