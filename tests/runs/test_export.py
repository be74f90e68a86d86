"""Hugging Face exports of sharded checkpoints (opcd/runs/export.py): `opcd export`, and the temporary
export `opcd evaluate` reads. The shards here are written by one process (torch.distributed.checkpoint
without a process group, the same format the FSDP2 ranks write; the two-rank path is in
tests/workers/test_fsdp_on_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from opcd.runs.checkpoint import save_checkpoint, step_dir, verify_checkpoint
from opcd.cli import main
from opcd.errors import OpcdError
from opcd.runs.export import export_checkpoint, model_folder


def _sharded_checkpoint(run_dir, model_path, step: int = 3, config_dtype: torch.dtype | None = None):
    import copy

    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)  # differs from the base model's weights

    def write(folder):
        dcp.save({"model": model.state_dict()}, checkpoint_id=folder / "weights", no_dist=True)
        config = copy.deepcopy(model.config)
        config.dtype = config_dtype or config.dtype  # what the trainer writes: the model's own dtype
        config.save_pretrained(folder / "model_config")
        AutoTokenizer.from_pretrained(model_path).save_pretrained(folder / "model_config")

    save_checkpoint(run_dir, step, write, {"step": step})
    return model


def test_export_writes_a_loadable_folder_with_the_checkpoint_weights(tmp_path, tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    trained = _sharded_checkpoint(tmp_path, tiny_model)
    assert main(["export", str(tmp_path), "3"]) == 0
    out = step_dir(tmp_path, 3) / "model"
    assert capsys.readouterr().out.strip() == str(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = trained.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())
    assert (out / "tokenizer.json").is_file()
    assert verify_checkpoint(step_dir(tmp_path, 3)) is None  # the export is listed in the checksums
    assert export_checkpoint(tmp_path, 3) == out  # a second call finds it


def test_export_is_written_in_the_model_dtype_one_tensor_at_a_time(tmp_path, tiny_model):
    """fp32 shards (the training's master weights) of a bf16 model export as bf16 files, the tied
    lm_head once, equal to the weights cast."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    trained = _sharded_checkpoint(tmp_path, tiny_model, config_dtype=torch.bfloat16)
    out = export_checkpoint(tmp_path, 3)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in set(f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    expected = trained.state_dict()
    assert [n for n in expected if not torch.equal(loaded[n], expected[n].to(torch.bfloat16))] == []


def test_export_of_a_missing_or_damaged_checkpoint_is_one_line(tmp_path, tiny_model, capsys):
    _sharded_checkpoint(tmp_path, tiny_model)
    capsys.readouterr()  # the model loading's progress bars
    assert main(["export", str(tmp_path), "4"]) == 2
    assert capsys.readouterr().err.strip() == f"opcd: error: no complete checkpoint for step 4 in {tmp_path} (found [3])"
    shard = next((step_dir(tmp_path, 3) / "weights").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(OpcdError, match=r"global_step_3 is damaged \(weights/__0_0.distcp does not match"):
        export_checkpoint(tmp_path, 3)


def test_evaluation_reads_a_temporary_export_and_keeps_no_copy(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    _sharded_checkpoint(tmp_path, tiny_model)
    scratch = tmp_path / "evaluation"
    scratch.mkdir()
    with model_folder(str(step_dir(tmp_path, 3)), scratch) as path:
        assert AutoModelForCausalLM.from_pretrained(path).model.norm.weight.eq(0.5).all()
    assert list(scratch.iterdir()) == [] and not (step_dir(tmp_path, 3) / "model").exists()
    with model_folder(str(tiny_model), scratch) as path:  # a plain model path is used as it is
        assert path == str(tiny_model)


def _published(run_dir, step: int) -> None:
    def write(folder):
        (folder / "weights.txt").write_text(str(step))
    save_checkpoint(run_dir, step, write, {"step": step})


def test_best_step_reads_opcd_evaluate_first_and_only_counts_checkpoints_on_disk(tmp_path):
    import json

    from opcd.runs.export import best_step

    for step in (2, 4, 6):
        _published(tmp_path, step)
    (tmp_path / "eval.json").write_text(json.dumps({
        "student_before": {"score": 0.9}, "student_step_2": {"score": 0.8}, "student_step_4": {"score": 0.3}}))
    assert best_step(tmp_path) == 2  # the in-training evaluations, without `student_before`
    (tmp_path / "evaluation").mkdir()
    # opcd evaluate's scores win; step 8 scored best but its checkpoint is gone; 4 and 6 tie: the later
    (tmp_path / "evaluation" / "results.json").write_text(json.dumps(
        {"checkpoints": {"2": 0.1, "4": 0.5, "6": 0.5, "8": 0.9}}))
    assert best_step(tmp_path) == 6


def test_best_export_without_scores_or_with_a_bad_argument_is_one_line(tmp_path, capsys):
    _published(tmp_path, 2)
    assert main(["export", str(tmp_path), "best"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"opcd: error: {tmp_path}: no best checkpoint to export (no held-out scores; complete checkpoints [2]): "
        f"run `opcd evaluate {tmp_path}` first, or name a step")
    (tmp_path / "eval.json").write_text("{not json")
    assert main(["export", str(tmp_path), "best"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"opcd: error: {tmp_path / 'eval.json'}: not valid JSON (Expecting property name enclosed in double quotes "
        f"at line 1 column 2); expected a JSON object")
    assert main(["export", str(tmp_path), "last"]) == 2
    assert capsys.readouterr().err.strip() == "opcd: error: opcd export: step 'last': expected a step number or best"


def test_best_step_counts_the_after_training_evaluation_at_its_step(tmp_path):
    """Regression: right after the demo (no eval_freq, no `opcd evaluate`), `opcd export RUN best` said
    'no held-out scores' although eval.json held the after-training score of the last checkpoint."""
    import json

    from opcd.runs.export import best_step

    for step in (20, 30):
        _published(tmp_path, step)
    (tmp_path / "eval.json").write_text(json.dumps({
        "student_before": {"score": 0.0}, "teacher_with_context": {"score": 0.75},
        "student_after": {"score": 0.75, "step": 30}}))
    assert best_step(tmp_path) == 30
    # an in-training score of the same step is not replaced; a better earlier one still wins
    (tmp_path / "eval.json").write_text(json.dumps({
        "student_step_20": {"score": 0.8}, "student_after": {"score": 0.75, "step": 30}}))
    assert best_step(tmp_path) == 20
    # an eval.json written before `student_after` named its step: the step is summary.json's final_step
    (tmp_path / "eval.json").write_text(json.dumps({"student_after": {"score": 0.75}}))
    (tmp_path / "summary.json").write_text(json.dumps({"final_step": 30}))
    assert best_step(tmp_path) == 30


def _one_rank_checkpoint(run_dir, model_path, step: int = 2):
    """A one-rank checkpoint: its model/ is a Hugging Face folder, as the student writes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    save_checkpoint(run_dir, step, lambda folder: model.save_pretrained(folder / "model") and None, {"step": step})
    return step_dir(run_dir, step)


def test_export_and_evaluation_refuse_a_one_rank_checkpoint_with_flipped_bytes(tmp_path, tiny_model, capsys):
    """Bug: `opcd export` and `opcd evaluate` used a one-rank checkpoint whose model.safetensors had 4 KiB of
    flipped bytes without checking its checksums (rc 0, a gibberish score in results.json)."""
    folder = _one_rank_checkpoint(tmp_path, tiny_model)
    assert export_checkpoint(tmp_path, 2) == folder / "model"
    weights = folder / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8192:-4096] = bytes(b ^ 0xFF for b in data[-8192:-4096])
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", str(tmp_path), "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"opcd: error: checkpoint {folder} is damaged (model/model.safetensors does not match its checksum "
        f"(flipped or truncated bytes)); not exporting it")
    with pytest.raises(OpcdError, match="model/model.safetensors does not match its checksum.*not evaluating it"):
        with model_folder(str(folder), tmp_path):
            pass


def test_export_of_a_junk_step_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """Bug: `opcd export RUN STEP` on a step folder holding junk returned its model/ with rc 0."""
    folder = step_dir(tmp_path, 5)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"junk")
    (folder / "COMPLETE").write_text("5")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", str(tmp_path), "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"opcd: error: checkpoint {folder} is damaged ({folder / 'checksums.sha256'} is missing); not exporting it")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("content", [b'{"checkpoints": {"2": 0.', b"", b"[0.5]", b'{"checkpoints": {"two": 0.5}}',
                                     b'{"checkpoints": {"2": "\xff"}}'])
def test_best_export_with_damaged_scores_is_one_line(tmp_path, capsys, content):
    _published(tmp_path, 2)
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "results.json").write_bytes(content)
    assert main(["export", str(tmp_path), "best"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opcd: error: {tmp_path / 'evaluation' / 'results.json'}: ") and "\n" not in err, err


def test_a_non_finite_score_is_never_the_best_checkpoint(tmp_path):
    import json

    from opcd.runs.export import best_step

    for step in (2, 4):
        _published(tmp_path, step)
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "results.json").write_text(json.dumps({"checkpoints": {"2": 0.3, "4": "nan"}}))
    assert best_step(tmp_path) == 2
