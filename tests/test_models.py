"""Tests for opcd.models: the converted tokenizer's checks, the built-in model, path resolution, and
the teacher/student compatibility checks."""

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from opcd.errors import ModelError
from opcd.models import (
    BUILTIN_SMOLLM2,
    build_causal_lm_on_meta,
    check_answers_paris,
    check_same_tokenizer,
    check_teacher_covers_student,
    check_tokenizer,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

# ChatML: the one template every SmolLM2 check and prompt test relies on.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# -- check_tokenizer -------------------------------------------------------------------------------

def test_converted_tokenizer_passes_every_check(smollm2_dir, smollm2_tokenizer):
    check_tokenizer(smollm2_tokenizer, str(smollm2_dir))  # raises on failure


def test_converted_tokenizer_round_trips_whitespace_and_adds_no_bos(smollm2_tokenizer):
    """The properties the broken GGUF conversions lose (DESIGN.md "Trap"), checked directly."""
    tokenizer = smollm2_tokenizer
    text = "two  spaces\n\nand\ttabs   end "
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # no BOS prepended
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_check_tokenizer_rejects_wrong_eos(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.eos_token = "<|im_start|>"  # the fault of the 4.57 / 5.19 conversions
    with pytest.raises(ModelError, match=r"tokenizer of WHERE has EOS '<\|im_start\|>', expected '<\|im_end\|>'"):
        check_tokenizer(tokenizer, "WHERE")


def test_check_tokenizer_rejects_non_chatml_template(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ModelError, match="chat template of WHERE does not render ChatML turns"):
        check_tokenizer(tokenizer, "WHERE")


def test_check_tokenizer_accepts_chatml_without_default_system_turn(smollm2_tokenizer):
    """The check asks for ChatML turns, not SmolLM2's particular default system message."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    check_tokenizer(tokenizer, "WHERE")


class _FaultyTokenizer:
    """Delegates to the real tokenizer; subclasses break one property the way a bad conversion does."""

    def __init__(self, real):
        self.real = real
        self.eos_token = real.eos_token

    def __call__(self, text, **kwargs):
        return self.real(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self.real.decode(ids, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.real.apply_chat_template(*args, **kwargs)


class _SpaceDroppingTokenizer(_FaultyTokenizer):
    """Like the 5.19 sentencepiece-style reload: decoding collapses runs of whitespace (the symptom that
    made the model answer gibberish)."""

    def decode(self, ids, **kwargs):
        return " ".join(self.real.decode(ids, **kwargs).split())


def test_check_tokenizer_rejects_lossy_round_trip(smollm2_tokenizer):
    tokenizer = _SpaceDroppingTokenizer(smollm2_tokenizer)
    with pytest.raises(ModelError, match="tokenizer of WHERE does not round-trip text"):
        check_tokenizer(tokenizer, "WHERE")


class _BosAddingTokenizer(_FaultyTokenizer):
    """Like the generic fast reload: prepends `<|im_start|>` as BOS when special tokens are on."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        out = self.real(text, add_special_tokens=False, **kwargs)
        if add_special_tokens:
            out["input_ids"] = [self.real.convert_tokens_to_ids("<|im_start|>"), *out["input_ids"]]
        return out


def test_check_tokenizer_rejects_added_bos(smollm2_tokenizer):
    tokenizer = _BosAddingTokenizer(smollm2_tokenizer)
    with pytest.raises(ModelError, match=r"tokenizer of WHERE adds special tokens \(BOS\)"):
        check_tokenizer(tokenizer, "WHERE")


# -- the built-in model ----------------------------------------------------------------------------

def test_builtin_model_answers_paris(smollm2_dir, smollm2_tokenizer):
    model = load_causal_lm(str(smollm2_dir)).eval()
    check_answers_paris(model, smollm2_tokenizer, str(smollm2_dir))  # raises on failure


def test_check_answers_paris_rejects_a_model_that_does_not_know(tiny_model, smollm2_tokenizer):
    """A random model with the right tokenizer passes the tokenizer checks but must fail this one."""
    model = load_causal_lm(str(tiny_model)).eval()
    with pytest.raises(ModelError, match="converted model WHERE answers .* to 'What is the capital of France\\?'"):
        check_answers_paris(model, smollm2_tokenizer, "WHERE")


def test_builtin_name_resolves_to_the_checked_folder(smollm2_dir):
    resolved = Path(resolve_model(BUILTIN_SMOLLM2))
    assert resolved == smollm2_dir
    assert (resolved / "config.json").is_file()


# -- resolve_model ---------------------------------------------------------------------------------

def test_resolve_model_passes_existing_folder_and_hub_ids(tiny_model):
    assert resolve_model(str(tiny_model)) == str(tiny_model)
    assert resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model-opcd", "a/b/c"])
def test_resolve_model_missing_local_path(path):
    with pytest.raises(ModelError, match=f"model path not found: {path} "):
        resolve_model(path)


def test_resolve_model_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=f"model folder {tmp_path} has no config.json"):
        resolve_model(str(tmp_path))


def test_folder_without_tokenizer_files_is_a_one_line_model_error(tiny_model, tmp_path):
    """Regression: a model folder saved without its tokenizer (config.json present, so resolve_model
    accepts it) made transformers raise a multi-line ValueError that escaped as a traceback instead
    of the CLI's one-line error."""
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelError, match=f"cannot load tokenizer from {tmp_path}: ") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


# -- teacher / student compatibility ---------------------------------------------------------------

def test_same_tokenizer_passes_for_models_sharing_it(tiny_model, tiny_deeper_model):
    check_same_tokenizer(load_tokenizer(str(tiny_model)), load_tokenizer(str(tiny_deeper_model)),
                         str(tiny_model), str(tiny_deeper_model))


def test_same_tokenizer_refuses_extended_vocab(smollm2_tokenizer):
    student = smollm2_tokenizer
    teacher = copy.deepcopy(smollm2_tokenizer)
    teacher.add_tokens(["<opcd_extra_a>", "<opcd_extra_b>"])
    with pytest.raises(ModelError) as err:
        check_same_tokenizer(student, teacher, "STUDENT_PATH", "TEACHER_PATH")
    message = str(err.value)
    assert "STUDENT_PATH" in message and "TEACHER_PATH" in message
    assert f"{len(student.get_vocab()) + 2} tokens" in message and f"has {len(student.get_vocab())}" in message


def test_same_tokenizer_refuses_different_eos(smollm2_tokenizer):
    student = smollm2_tokenizer
    teacher = copy.deepcopy(smollm2_tokenizer)
    teacher.eos_token = "<|im_start|>"
    with pytest.raises(ModelError, match="teacher T EOS id 1 != student S EOS id 2"):
        check_same_tokenizer(student, teacher, "S", "T")


def test_teacher_with_more_embedding_rows_is_accepted(tiny_model, tiny_padded_teacher):
    """Regression: equal embedding sizes were demanded, refusing Qwen2.5-7B (152,064 rows) -> 3B (151,936)."""
    student, teacher = AutoConfig.from_pretrained(tiny_model), AutoConfig.from_pretrained(tiny_padded_teacher)
    assert teacher.vocab_size == student.vocab_size + 64
    check_teacher_covers_student(student, teacher, "S", "T")
    check_same_tokenizer(load_tokenizer(str(tiny_model)), load_tokenizer(str(tiny_padded_teacher)), "S", "T")
    with pytest.raises(ModelError, match=f"^teacher S has {student.vocab_size} embedding rows but student T can "
                                         f"emit ids up to {teacher.vocab_size - 1}: "):
        check_teacher_covers_student(teacher, student, "T", "S")


def test_same_tokenizer_refuses_different_special_tokens(smollm2_tokenizer):
    teacher = copy.deepcopy(smollm2_tokenizer)
    teacher.bos_token = "<|im_end|>"
    with pytest.raises(ModelError, match=r"^teacher T bos_token is '<\|im_end\|>' but student S bos_token is "):
        check_same_tokenizer(smollm2_tokenizer, teacher, "S", "T")


def test_same_tokenizer_refuses_a_chat_template_with_another_stop_token(smollm2_tokenizer):
    teacher = copy.deepcopy(smollm2_tokenizer)
    teacher.chat_template = teacher.chat_template.replace("<|im_end|>", "<|endoftext|>")
    with pytest.raises(ModelError, match=r"^teacher T chat template ends an assistant turn with '<\|endoftext\|>' "
                                         r"but student S with '<\|im_end\|>'"):
        check_same_tokenizer(smollm2_tokenizer, teacher, "S", "T")


def test_prepare_accepts_a_padded_teacher(tiny_model, tiny_padded_teacher, tmp_path):
    from opcd.config import load_config
    from opcd.pipelines.distill import prepare

    cfg = load_config([f"model.path={tiny_model}", f"model.teacher_path={tiny_padded_teacher}",
                       f"trainer.runs_dir={tmp_path}"])
    assert prepare(cfg).teacher_path == str(tiny_padded_teacher)



def test_load_causal_lm_dtype(tiny_model):
    model = load_causal_lm(str(tiny_model), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_cached_conversion_with_owner_only_weights_is_opened_to_the_umask(tmp_path, monkeypatch):
    """Regression: the converted model cache held model.safetensors with mode 600 (and a 700 folder
    from mkdtemp); a cache written that way is fixed when it is next used."""
    import os
    import stat

    from opcd.models import ensure_builtin_smollm2

    monkeypatch.setenv("OPCD_CACHE", str(tmp_path))
    target = tmp_path / "models" / BUILTIN_SMOLLM2
    target.mkdir(parents=True, mode=0o700)
    target.chmod(0o700)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "model.safetensors").chmod(0o600)
    assert ensure_builtin_smollm2() == target
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask


def test_a_relative_model_folder_resolves_to_an_absolute_path(tiny_model, monkeypatch):
    """Regression (issue 23 §3): a relative model.path went to the workers as it was, and a worker on
    another node resolves it against its own working folder (its node's, not the driver's)."""
    monkeypatch.chdir(tiny_model.parent)
    assert resolve_model(tiny_model.name) == str(tiny_model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_meta_build_is_the_loaded_architecture_without_weights(tiny_model, dtype):
    """What a sharded group's ranks other than 0 build: the loaded model's names, shapes, dtype, attention
    (flash-attention falls back to SDPA on CPU as in load_causal_lm), generation config and tied head,
    all on the meta device."""
    loaded = load_causal_lm(str(tiny_model), dtype, attn_implementation="flash_attention_2")
    meta = build_causal_lm_on_meta(str(tiny_model), dtype, attn_implementation="flash_attention_2")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    shapes = {name: (t.shape, t.dtype) for name, t in meta.state_dict().items()}
    assert shapes == {name: (t.shape, t.dtype) for name, t in loaded.state_dict().items()}
    assert [name for name, _ in meta.named_buffers()] == [name for name, _ in loaded.named_buffers()]
    assert meta.config._attn_implementation == loaded.config._attn_implementation == "sdpa"
    assert meta.generation_config.to_dict() == loaded.generation_config.to_dict()
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert meta.training == loaded.training
