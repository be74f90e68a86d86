"""Which attention kernel a model is loaded with: the configured one, or SDPA when flash-attention was
asked for and cannot run here.

The `hf` model preset asks for `flash_attention_2` (the cluster default: variable-length kernels, so
packed rows pay). transformers refuses to load such a model when the `flash_attn` package is missing
or broken (an ABI mismatch with torch shows up as an ImportError), and the kernels run on CUDA only.
Then the model is loaded with PyTorch's `sdpa` instead, with one warning line per process. Packing
follows the loaded model, as before (opcd/workers/lm_head.py `packing_pays`: packed rows only with a
flash kernel unless trainer.padding_free says otherwise), so the fallback also turns packing off.
"""

from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger(__name__)

FLASH_KERNELS = ("flash_attention_2",)  # the kernels of the `flash_attn` package
FALLBACK = "sdpa"


def choose_attention(requested: str | None, on_cuda: bool, flash_importable: bool) -> tuple[str | None, str | None]:
    """(the implementation to load with, why it differs from `requested` or None). Pure: the caller says
    whether this process computes on CUDA and whether `flash_attn` imports."""
    if requested not in FLASH_KERNELS:
        return requested, None
    if not on_cuda:
        return FALLBACK, "no CUDA device in this process (flash-attention kernels run on CUDA only)"
    if not flash_importable:
        return FALLBACK, "the flash_attn package is not importable here"
    return requested, None


@functools.lru_cache(maxsize=1)
def flash_attn_importable() -> bool:
    """Whether `import flash_attn` works (not only whether it is installed: a wheel built for another
    torch fails at import with an undefined symbol)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # ImportError, OSError from the extension, RuntimeError from a CUDA check
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_once(requested: str, chosen: str, reason: str) -> None:
    log.warning("model.attn_implementation=%s: %s; using %s instead (packed rows then only with "
                "trainer.padding_free=true)", requested, reason, chosen)


def resolve_attention(requested: str | None, on_cuda: bool) -> str | None:
    """`choose_attention` for this process, with its one warning line when it falls back. flash_attn is
    imported only when it could be used (a CUDA process asking for it)."""
    importable = requested in FLASH_KERNELS and on_cuda and flash_attn_importable()
    chosen, reason = choose_attention(requested, on_cuda, importable)
    if reason is not None:
        _warn_once(requested, chosen, reason)
    return chosen
