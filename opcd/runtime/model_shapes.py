"""A decoder model's shape read from its config.json (a plain dict), and the sizes the memory plan
derives from it: parameters per decoder layer and outside the layers, KV-cache bytes per token.

Pure: no transformers, no files. The CLI edge reads config.json; for a hub name with no local copy
(no hub access before a launch) a small bundled table of known configs stands in (`KNOWN_CONFIGS`).
Architectures covered exactly: Llama, Qwen2 (q/k/v biases), Qwen3 (q/k RMS norms).
"""

from __future__ import annotations

from dataclasses import dataclass

from opcd.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the embedding's weights
    qkv_bias: bool  # Qwen2: biases on q, k, v
    o_bias: bool  # Llama attention_bias=true: biases on q, k, v and o
    qk_norm: bool  # Qwen3: an RMS norm of head_dim on q and on k

    @classmethod
    def from_config(cls, config: dict, where: str) -> ModelShape:
        """From a Hugging Face config dict; a missing or bad field is one ConfigError line naming it."""
        def need(key):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: field {key}={value!r}: expected a positive integer")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kind = config.get("model_type", "")
        bias = bool(config.get("attention_bias", False))
        return cls(layers=need("num_hidden_layers"), hidden=hidden, heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or hidden // heads, intermediate=need("intermediate_size"),
                   vocab=need("vocab_size"), tied=bool(config.get("tie_word_embeddings", False)),
                   qkv_bias=bias or kind == "qwen2", o_bias=bias and kind != "qwen2",
                   qk_norm=kind.startswith("qwen3"))

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (q, k, v, o), gated MLP (gate, up, down), two RMS norms."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        attention = h * q + 2 * h * kv + q * h
        attention += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Outside the layers (FSDP2's root group): embedding, final norm, lm_head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """K and V of every layer for one token, on one GPU of a tensor-parallel engine (vLLM splits the
        KV heads over the engine's GPUs and replicates them when there are fewer heads than GPUs)."""
        heads = max(self.kv_heads // tensor_parallel, 1)
        return 2 * self.layers * heads * self.head_dim * dtype_bytes


def _qwen3(layers, hidden, heads, intermediate, tied):
    return {"model_type": "qwen3", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": intermediate, "vocab_size": 151936,
            "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "max_position_embeddings": 40960}


# Copied field by field from the models' published config.json files (only the fields the plan reads).
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-8B": _qwen3(36, 4096, 32, 12288, False),
    "Qwen/Qwen3-4B": _qwen3(36, 2560, 32, 9728, True),
    "Qwen/Qwen3-1.7B": _qwen3(28, 2048, 16, 6144, True),
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 131072},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 8192},
}
KNOWN_CONFIGS["smollm2-135m-instruct"] = KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]
