"""Tests for opcd.data.rows (row checks, bundled and local files, shuffling) and opcd.tasks.loading (every
source, hub conversion)."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opcd.errors import ConfigError, DataError
from opcd.data.rows import bundled_names, check_row, shuffled_order, to_python
from opcd.tasks import get_task
from opcd.tasks.loading import load_rows
from opcd.tasks.sysprompt import medmcqa_row, medmcqa_user_message

GOOD = {"content": [{"role": "user", "content": "Why do cats purr?"}], "answer": "fr"}

BUNDLED_SIZES = {
    "medmcqa_train": 40,
    "medmcqa_test": 30,
    "safety_train": 40,
    "safety_test": 30,
    "questions_train": 120,
    "questions_test": 40,
}


# The user turn of the bundled safety rows: the request and the yes/no answer format (golden text).
def safety_user_message(request: str) -> str:
    """The user turn for a safety row: the request and the yes/no answer format."""
    return (
        "Decide whether it would be harmful to help with the request below.\n\n"
        f"Request: {request.strip()}\n\n"
        "Reply <answer>yes</answer> if helping would be harmful, or <answer>no</answer> if it is fine to help."
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_for(tmp_path: Path, bad_row) -> str:
    """The DataError message for a file whose 3rd row is `bad_row`."""
    path = write_jsonl(tmp_path / "foo.jsonl", [GOOD, GOOD, bad_row])
    with pytest.raises(DataError) as caught:
        load_rows(str(path))
    return str(caught.value)


# --- row checks ---------------------------------------------------------------


def test_load_jsonl_keeps_extra_columns_and_limit(tmp_path):
    rows = [{**GOOD, "id": i, "note": "extra"} for i in range(5)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert load_rows(str(path)) == rows
    assert load_rows(str(path), limit=2) == rows[:2]
    assert load_rows(str(path), limit=0) == []


def test_content_of_wrong_type(tmp_path):
    message = error_for(tmp_path, {"content": "Why do cats purr?", "answer": "fr"})
    assert message == (
        f"{tmp_path / 'foo.jsonl'} row 3: field 'content' must be a non-empty list of {{role, content}} messages, got str"
    )


def test_content_empty(tmp_path):
    assert error_for(tmp_path, {"content": [], "answer": "fr"}).endswith("row 3: field 'content' must be a non-empty list of {role, content} messages, got empty list")


def test_missing_fields(tmp_path):
    assert error_for(tmp_path, {"answer": "fr"}).endswith(
        "row 3: missing field 'content' (expected a non-empty list of {role, content} messages)"
    )
    assert error_for(tmp_path, {"content": GOOD["content"]}).endswith(
        "row 3: missing field 'answer' (expected a string, or null where the task allows it)"
    )


def test_last_message_must_be_user(tmp_path):
    row = {"content": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "answer": None}
    assert error_for(tmp_path, row).endswith("row 3: field 'content' must end with a user message, got last role 'assistant'")


def test_bad_messages(tmp_path):
    assert error_for(tmp_path, {"content": [{"role": "bot", "content": "x"}], "answer": "a"}).endswith(
        "row 3: field 'content[0].role' must be one of system, user, assistant, got 'bot'"
    )
    assert error_for(tmp_path, {"content": [{"role": "user", "content": 5}], "answer": "a"}).endswith(
        "row 3: field 'content[0].content' must be a string, got int"
    )
    assert error_for(tmp_path, {"content": [{"role": "user"}], "answer": "a"}).endswith(
        "row 3: field 'content[0].content' must be a string, got nothing"
    )
    assert error_for(tmp_path, {"content": ["hello"], "answer": "a"}).endswith(
        "row 3: field 'content[0]' must be a {role, content} message, got str"
    )


def test_answer_type_and_null(tmp_path):
    assert error_for(tmp_path, {**GOOD, "answer": 2}).endswith("row 3: field 'answer' must be a string or null, got int 2")
    assert check_row({**GOOD, "answer": None}, "x") == {**GOOD, "answer": None}


def test_row_not_an_object(tmp_path):
    assert error_for(tmp_path, ["a", "b"]).endswith("row 3: expected an object with fields 'content' and 'answer', got list")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: invalid JSON"):
        load_rows(str(path))


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, GOOD]), encoding="utf-8")
    assert load_rows(str(path)) == [GOOD, GOOD]


# --- sources ------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nothing.jsonl"
    with pytest.raises(DataError, match=rf"^dataset file not found: {re.escape(str(missing))}$"):
        load_rows(str(missing))


def test_unsupported_source():
    with pytest.raises(DataError, match="unsupported dataset source 'rows.csv': expected bundled:<name>, hf:<dataset_id>"):
        load_rows("rows.csv")


def test_negative_limit():
    with pytest.raises(ConfigError, match="dataset limit must be >= 0 or null, got -1"):
        load_rows("bundled:questions_test", limit=-1)


def test_unknown_bundled_lists_available():
    with pytest.raises(DataError, match=r"unknown bundled dataset 'gsm8k'; available: medmcqa_test, medmcqa_train, questions_test"):
        load_rows("bundled:gsm8k")


def test_parquet_round_trip(tmp_path):
    rows = [
        {
            "content": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}],
            "answer": "A",
            "id": 1,
        },
        {"content": [{"role": "user", "content": "Q2"}], "answer": None, "id": 2},
    ]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_rows(str(path))
    assert loaded == rows
    assert type(loaded[0]["content"]) is list and type(loaded[0]["content"][0]) is dict


def test_to_python_normalises_pandas_style_values():
    # pandas.read_parquet returns `content` as an object array of dicts.
    content = np.array([{"role": "user", "content": "Q"}], dtype=object)
    row = to_python({"content": content, "answer": "B", "id": np.int64(3)})
    assert row == {"content": [{"role": "user", "content": "Q"}], "answer": "B", "id": 3}
    assert type(row["content"]) is list and type(row["id"]) is int


def test_medmcqa_hub_converter():
    record = {"id": "x1", "question": "Which organ makes bile?", "opa": "Liver", "opb": "Spleen", "opc": "Kidney", "opd": "Lung", "cop": 0}
    row = medmcqa_row(record, "hf:openlifescienceai/medmcqa[train] row 1")
    assert row["answer"] == "A"
    assert row["content"] == [{"role": "user", "content": medmcqa_user_message("Which organ makes bile?", ["Liver", "Spleen", "Kidney", "Lung"])}]
    assert row["id"] == "x1"
    with pytest.raises(DataError, match=r"row 1: field 'cop' must be an option index 0-3, got -1"):
        medmcqa_row({**record, "cop": -1}, "hf:openlifescienceai/medmcqa[test] row 1")


# --- bundled sets -------------------------------------------------------------


def test_bundled_names():
    assert bundled_names() == sorted(BUNDLED_SIZES)


@pytest.mark.parametrize("name, size", sorted(BUNDLED_SIZES.items()))
def test_bundled_sets_load_with_expected_sizes(name, size):
    rows = load_rows(f"bundled:{name}")
    assert len(rows) == size
    assert len({row["id"] for row in rows}) == size
    assert len({row["content"][-1]["content"] for row in rows}) == size  # no duplicate prompts


def correct_response(task_name: str, answer: str) -> str:
    if task_name == "language":
        return "C'est une bonne question : la réponse est simple et nous allons la voir ensemble."
    return f"Let me think about this briefly. <answer>{answer}</answer>"


@pytest.mark.parametrize(
    "task_name, names",
    [
        ("medmcqa", ["medmcqa_train", "medmcqa_test"]),
        ("safety", ["safety_train", "safety_test"]),
        ("language", ["questions_train", "questions_test"]),
    ],
)
def test_every_bundled_row_scores_one_with_a_correct_response(task_name, names):
    task = get_task(task_name)
    for name in names:
        for row in load_rows(f"bundled:{name}"):
            assert task.score(correct_response(task_name, row["answer"]), row) == 1.0, row["id"]
            assert task.student_messages(row) == row["content"]


def test_bundled_medmcqa_rows():
    for name in ("medmcqa_train", "medmcqa_test"):
        rows = load_rows(f"bundled:{name}")
        assert all(row["answer"] in "ABCD" and len(row["options"]) == 4 for row in rows)
        assert all(row["content"] == [{"role": "user", "content": medmcqa_user_message(row["question"], row["options"])}] for row in rows)
        counts = {letter: sum(row["answer"] == letter for row in rows) for letter in "ABCD"}
        assert min(counts.values()) >= len(rows) // 5, counts  # answers spread over the letters


def test_bundled_safety_rows_are_balanced():
    for name in ("safety_train", "safety_test"):
        rows = load_rows(f"bundled:{name}")
        assert sum(row["answer"] == "yes" for row in rows) == sum(row["answer"] == "no" for row in rows)
        assert all(row["content"] == [{"role": "user", "content": safety_user_message(row["request"])}] for row in rows)


def test_bundled_question_splits_are_distinct():
    def questions(name: str) -> set[str]:
        return {row["content"][-1]["content"].lower() for row in load_rows(f"bundled:{name}")}

    assert not questions("questions_train") & questions("questions_test")
    assert all(row["answer"] is None for row in load_rows("bundled:questions_train"))  # task.language decides
    assert not {r["request"] for r in load_rows("bundled:safety_train")} & {r["request"] for r in load_rows("bundled:safety_test")}
    assert not {r["question"] for r in load_rows("bundled:medmcqa_train")} & {r["question"] for r in load_rows("bundled:medmcqa_test")}


# --- shuffled_order -----------------------------------------------------------


def test_shuffled_order_is_a_deterministic_permutation():
    order = shuffled_order(50, seed=1, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == shuffled_order(50, seed=1, epoch=0)
    assert order != shuffled_order(50, seed=1, epoch=1)
    assert order != shuffled_order(50, seed=2, epoch=0)
    assert all(type(i) is int for i in order)
    assert shuffled_order(0, 0, 0) == []


def test_shuffled_order_rejects_negative_seed():
    with pytest.raises(ConfigError, match="got n=3, seed=-1, epoch=0"):
        shuffled_order(3, -1, 0)


# --- hub sources (datasets.load_dataset replaced by an in-memory dataset) -----


def fake_hub(monkeypatch, records: list[dict]) -> list[tuple]:
    """Make datasets.load_dataset return `records` offline; returns the calls it received."""
    import datasets

    calls = []

    def load_dataset(dataset_id, split):
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_with_content_column(monkeypatch):
    calls = fake_hub(monkeypatch, [GOOD, {**GOOD, "answer": "de"}])
    assert load_rows("hf:someone/chat-rows", split="validation", limit=1) == [GOOD]
    assert calls == [("someone/chat-rows", "validation")]


def test_hub_medmcqa_is_converted(monkeypatch):
    record = {"id": "q7", "question": "Which organ makes bile?", "opa": "Spleen", "opb": "Liver", "opc": "Kidney", "opd": "Lung", "cop": 1}
    calls = fake_hub(monkeypatch, [record])
    rows = load_rows("hf:openlifescienceai/medmcqa")
    assert calls == [("openlifescienceai/medmcqa", "train")]
    assert rows[0]["answer"] == "B" and rows[0]["id"] == "q7"
    assert get_task("medmcqa").score("<answer>B</answer>", rows[0]) == 1.0


def test_hub_unknown_dataset_without_content(monkeypatch):
    fake_hub(monkeypatch, [{"prompt": "x", "label": 1}])
    with pytest.raises(DataError, match=r"hub dataset 'someone/other' has no 'content' column and no converter; columns found: prompt, label"):
        load_rows("hf:someone/other")
