"""Out-of-distribution checks through lm-evaluation-harness, offline: a local generative task and a
local IFEval-format task (IFEval's own scoring code, three hand-written prompts) on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opcd.errors import ConfigError
from opcd.pipelines.ood import run_lm_eval

QA_TASK = """task: opcd_tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write a haiku about rain. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a cat in lowercase letters only.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 3, "prompt": "Name a fruit. End your answer with the exact phrase 'That is all.'",
     "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "That is all."}]},
]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    import lm_eval

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    qa = folder / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "What is 2 + 2?", "answer": "4"},
                                                          {"question": "Capital of France?", "answer": "Paris"}]))
    (folder / "opcd_tiny_qa.yaml").write_text(QA_TASK.format(data=qa))
    # IFEval's task, pointed at local rows; its scoring modules are taken from the installed lm-eval
    ifeval = Path(lm_eval.__file__).parent / "tasks" / "ifeval"
    local = folder / "ifeval_local"
    local.mkdir()
    for module in ("utils.py", "instructions.py", "instructions_registry.py", "instructions_util.py"):
        shutil.copy(ifeval / module, local / module)
    (local / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS))
    spec = (ifeval / "ifeval.yaml").read_text()
    spec = spec.replace("task: ifeval", "task: opcd_ifeval_local").replace(
        "dataset_path: google/IFEval", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {local / 'rows.jsonl'}"
    ).replace("max_gen_toks: 1280", "max_gen_toks: 12")
    (local / "opcd_ifeval_local.yaml").write_text(spec)
    return folder


def test_local_generative_task(tasks_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = run_lm_eval(str(tiny_model), ["opcd_tiny_qa"], include_path=str(tasks_dir))
    assert results["opcd_tiny_qa"]["exact_match"] in (0.0, 0.5, 1.0)
    assert results["opcd_tiny_qa"]["sample_len"] == 2


def test_ifeval_scoring_on_local_rows(tasks_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = run_lm_eval(str(tiny_model), ["opcd_ifeval_local"], include_path=str(tasks_dir), limit=3)
    metrics = results["opcd_ifeval_local"]
    for name in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["sample_len"] == 3


def test_unknown_task_is_a_config_error(tasks_dir, tiny_model):
    with pytest.raises(ConfigError, match=r"evaluate.ood_tasks: unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(str(tiny_model), ["no_such_task"], include_path=str(tasks_dir))


def test_ifeval_with_the_reference_sampling_is_seeded(tasks_dir, tiny_model, monkeypatch):
    """The reference's IFEval settings (sampled: T 0.7, top-p 0.8, top-k 20, min-p 0; seed 42; thinking
    off) reach lm-eval, which accepts them, and the same seed gives the same scores."""
    from opcd.pipelines.ood import REFERENCE_SEED

    REFERENCE_GEN_KWARGS = "temperature=0.7,top_p=0.8,top_k=20,min_p=0,do_sample=True"  # the reference's IFEval command

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    runs = [run_lm_eval(str(tiny_model), ["opcd_ifeval_local"], include_path=str(tasks_dir), limit=3,
                        enable_thinking=False, gen_kwargs=REFERENCE_GEN_KWARGS, seed=REFERENCE_SEED)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert 0.0 <= runs[0]["opcd_ifeval_local"]["prompt_level_strict_acc"] <= 1.0
