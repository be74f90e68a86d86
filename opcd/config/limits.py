"""Bounds that come from the model itself (its config), checked once the model is known."""

from __future__ import annotations

from opcd.config.schema import DistillConfig, _check


def check_model_limits(cfg: DistillConfig, model_config, where: str) -> int:
    """Bounds that come from the student's model config (`where`: its path, for the message): the
    response must fit the model's positions, top-k sizes the vocabulary. Returns the number of
    positions (0 when the config does not say), which prompts plus responses must fit in."""
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    positions = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    if positions:
        _check(cfg.rollout.max_response_length < positions, "rollout.max_response_length",
               cfg.rollout.max_response_length, f"fewer tokens than the model's max_position_embeddings={positions} "
               f"({where})")
    if vocab:
        for key, value in (("loss.kl_topk", cfg.loss.kl_topk), ("rollout.top_k", cfg.rollout.top_k),
                           ("rollout.eval_top_k", cfg.rollout.eval_top_k)):
            _check(value <= vocab, key, value, f"at most the model's vocab_size={vocab} ({where})")
    return positions
