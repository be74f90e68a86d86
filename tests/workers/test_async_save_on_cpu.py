"""A checkpoint written in the background by 2 gloo ranks (StudentWorker.start_save with background) holds
the state AT its start, although an update ran while it was written: it loads to the same weights and
optimizer state as a synchronous save of that state, and each rank's report lists its files' checksums."""

from __future__ import annotations

import pytest
import torch

from opcd.protocol import UpdateBatch
from opcd.runs.checkpoint import WRITTEN, file_sha256, written_checksums
from opcd.workers.group import WorkerGroup
from opcd.workers.spec import WorkerSpec
from opcd.workers.student import StudentWorker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _batch(tokenizer, rows: int = 4, length: int = 5, k: int = 4) -> UpdateBatch:
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer.encode(f"Question number {i}?") for i in range(rows)]
    response_ids = torch.randint(10, 1000, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, 3:] = False
    support = torch.randint(10, 1000, (rows, length, k), generator=generator)
    teacher = torch.log_softmax(torch.randn(rows, length, k, generator=generator), dim=-1)
    return UpdateBatch(prompt_ids=prompts, response_ids=response_ids, response_mask=mask, support_ids=support,
                       support_mask=None, teacher_logprobs=teacher, num_tokens=int(mask.sum()), num_sequences=rows)


def _group(name: str, model) -> WorkerGroup:
    spec = WorkerSpec.build(str(model), num_threads=1, micro_batch_size=2, lr=1e-3)
    return WorkerGroup(name, StudentWorker, {"spec": spec}, world_size=2)


def test_a_background_save_holds_the_state_at_its_start_and_equals_a_synchronous_one(
        tiny_model, smollm2_tokenizer, tmp_path):
    batch = _batch(smollm2_tokenizer)
    student = _group("writer", tiny_model)
    student.gather(StudentWorker.update, batch)  # AdamW has moments to save
    at_save = student.gather(StudentWorker.state_dict)
    synchronous, background = tmp_path / "sync", tmp_path / "background"
    for folder in (synchronous, background):
        folder.mkdir()
    student.call(StudentWorker.save, str(synchronous))
    assert student.call(StudentWorker.start_save, str(background), False, True) == [None, None]
    student.gather(StudentWorker.update, batch)  # changes every parameter in place while the ranks write
    moved = student.gather(StudentWorker.state_dict)
    assert student.call(StudentWorker.finish_save) == [None, None]
    student.shutdown()
    assert any(not torch.equal(moved[name], at_save[name]) for name in at_save)

    checksums = written_checksums(background, [0, 1], step=1)
    assert {"weights/__0_0.distcp", "weights/__1_0.distcp", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp",
            "weights/.metadata", "optimizer/.metadata", "model_config/config.json"} <= set(checksums)
    assert all(file_sha256(background / rel) == digest for rel, digest in checksums.items())
    assert not (background / WRITTEN).exists()

    after = {}
    for name, folder in (("sync", synchronous), ("background", background)):
        reader = _group(f"reader-{name}", tiny_model)
        reader.call(StudentWorker.load, str(folder), True)
        loaded = reader.gather(StudentWorker.state_dict)
        assert [n for n in at_save if not torch.equal(loaded[n], at_save[n])] == [], name
        reader.gather(StudentWorker.update, batch)  # the same step from the same optimizer state
        after[name] = reader.gather(StudentWorker.state_dict)
        reader.shutdown()
    assert [n for n in after["sync"] if not torch.equal(after["sync"][n], after["background"][n])] == []
