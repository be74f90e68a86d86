"""The attention-kernel fallback (opcd/runtime/attention.py): flash-attention that cannot run here
becomes SDPA with one warning line, and packing follows the kernel the model was loaded with."""

import logging
import sys

import pytest

from opcd.models import load_causal_lm
from opcd.runtime import attention as A
from opcd.workers.lm_head import packing_pays


@pytest.mark.parametrize("requested, on_cuda, importable, chosen, falls_back", [
    ("flash_attention_2", True, True, "flash_attention_2", False),
    ("flash_attention_2", True, False, "sdpa", True),
    ("flash_attention_2", False, True, "sdpa", True),   # installed, but this process has no GPU
    ("flash_attention_2", False, False, "sdpa", True),
    ("sdpa", False, False, "sdpa", False),
    ("eager", True, False, "eager", False),
    (None, True, False, None, False),                    # transformers' own choice is left alone
])
def test_choice(requested, on_cuda, importable, chosen, falls_back):
    got, reason = A.choose_attention(requested, on_cuda, importable)
    assert got == chosen
    assert (reason is not None) == falls_back


def test_reasons_say_why():
    assert "not importable" in A.choose_attention("flash_attention_2", True, False)[1]
    assert "no CUDA device" in A.choose_attention("flash_attention_2", False, True)[1]


def test_an_unimportable_flash_attn_is_seen(monkeypatch):
    """A package that is installed but fails at import (a wheel built for another torch) counts as absent."""
    A.flash_attn_importable.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    try:
        assert A.flash_attn_importable() is False
    finally:
        A.flash_attn_importable.cache_clear()


def test_one_warning_line_per_process(caplog):
    A._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        for _ in range(3):
            assert A.resolve_attention("flash_attention_2", on_cuda=False) == "sdpa"
        assert A.resolve_attention("sdpa", on_cuda=False) == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("model.attn_implementation=flash_attention_2: no CUDA device") and "sdpa" in lines[0]


def test_the_hf_preset_loads_on_cpu_with_sdpa_and_no_packing(tiny_model, caplog):
    """Regression: the `hf` preset's flash_attention_2 made transformers refuse to load the model where
    flash_attn cannot run (CPU, or a GPU node without the package)."""
    A._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        model = load_causal_lm(str(tiny_model), "float32", attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert not packing_pays(model)  # today's rule: packed rows pay with a flash kernel only
    assert len(caplog.records) == 1


@pytest.mark.gpu
def test_on_a_gpu_the_choice_follows_flash_attn(tiny_model):
    """With CUDA: flash_attention_2 when flash_attn imports, else SDPA, and the model loads either way."""
    expected = "flash_attention_2" if A.flash_attn_importable() else "sdpa"
    model = load_causal_lm(str(tiny_model), "bfloat16", attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == expected
