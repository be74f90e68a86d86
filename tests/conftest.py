"""Shared fixtures: tiny randomly initialised models that use the REAL SmolLM2 tokenizer.

The tokenizer comes from the bundled default (converted once into $OPCD_CACHE); the models are
shrunk copies of its config (head_dim 64, as vLLM needs), built in a temp dir in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason shown, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tiny_model(base: Path, out: Path, layers: int, seed: int, vocab_size: int | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
                   "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
                   "max_position_embeddings": 1024, "vocab_size": vocab_size or config.vocab_size})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from opcd.models import ensure_builtin_smollm2

    return ensure_builtin_smollm2()


@pytest.fixture(scope="session")
def tiny_model(smollm2_dir, tmp_path_factory) -> Path:
    return _tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny-student"), layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_deeper_model(smollm2_dir, tmp_path_factory) -> Path:
    """A different, deeper model with the same tokenizer: a larger-teacher stand-in."""
    return _tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny-teacher"), layers=3, seed=1)


@pytest.fixture(scope="session")
def tiny_padded_teacher(smollm2_dir, tmp_path_factory) -> Path:
    """Same tokenizer, 64 more embedding rows than the student (like Qwen2.5-7B's 152,064 vs 3B's 151,936)."""
    return _tiny_model(smollm2_dir, tmp_path_factory.mktemp("tiny-padded-teacher"), layers=3, seed=2,
                       vocab_size=49152 + 64)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """The real converted tokenizer, loaded once. Shared: tests must not modify it (load a fresh one)."""
    from opcd.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def _sharpened(src: Path, out: Path, scale: float) -> Path:
    """A copy of `src` whose (tied) embedding is scaled up. A freshly initialised tiny model is almost
    uniform over the 49k-token vocabulary (entropy ~ln V, KL between two of them ~1e-5), which makes
    loss values too small to tell a bug from rounding; scaled by 10 the next-token entropy is a few
    nats, the top-8 holds most of the mass, and two such models are a KL of ~0.2 apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert model.config.tie_word_embeddings, "scaling the input embedding must also scale the output head"
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sharp_tiny_model(tiny_model, tmp_path_factory) -> Path:
    """tiny_model with peaked next-token distributions (see `_sharpened`)."""
    return _sharpened(tiny_model, tmp_path_factory.mktemp("sharp-tiny-student"), scale=10.0)


@pytest.fixture(scope="session")
def sharp_tiny_deeper_model(tiny_deeper_model, tmp_path_factory) -> Path:
    """tiny_deeper_model with peaked next-token distributions: a teacher far enough from the student."""
    return _sharpened(tiny_deeper_model, tmp_path_factory.mktemp("sharp-tiny-teacher"), scale=10.0)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for one test module's end-to-end runs, shut down after it."""
    import ray

    from opcd.workers.group import init_ray

    init_ray(None, 8)
    yield
    ray.shutdown()
