"""tools/prepare_data.py: the seven datasets of the reference, converted through `datasets` from local
fixtures laid out as their hub repositories (the hub is out of reach here; `--source` takes the same
code path as the hub id), written where the launchers look, loadable by opcd."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opcd.tasks.loading import load_rows

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["dapo_train", "dapo_validation", "dapo_test", "sys_medmcqa_train", "sys_medmcqa_test",
         "sys_safety_train", "sys_safety_test"]


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _dapo_rows(n: int) -> list[dict]:
    """The reference's DAPO layout (method.md §4): chat messages, a data source, the ground truth."""
    return [{"data_source": "math_dapo",
             "content": [{"role": "user", "content": f"Compute {i} + {i}. Put the answer after 'Answer:'."}],
             "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": str(i)}} for i in range(n)]


def _sys_rows(kind: str, n: int) -> list[dict]:
    """The reference's system-prompt layout: chat messages and the answer (a letter, or yes/no)."""
    answers = ["A", "B", "C", "D"] if kind == "medmcqa" else ["yes", "no"]
    return [{"data_source": f"sys_{kind}", "content": [{"role": "user", "content": f"{kind} item {i}?"}],
             "answer": answers[i % len(answers)]} for i in range(n)]


def _fixture(root: Path, rows_of: dict[str, list[dict]]) -> None:
    """One folder per dataset holding the file a hub repository of one train split holds."""
    for name, rows in rows_of.items():
        folder = root / name / "data"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")


def _all_layouts(root: Path) -> dict[str, list[dict]]:
    rows_of = {name: _dapo_rows(5 + i) for i, name in enumerate(NAMES[:3])}
    rows_of |= {name: _sys_rows(name.split("_")[1], 4) for name in NAMES[3:]}
    _fixture(root, rows_of)
    return rows_of


def test_the_seven_reference_datasets_are_the_sources():
    assert [s.hub_id for s in _tool().SOURCES] == [f"ytz20/{n}" for n in NAMES]


def test_every_layout_converts_into_data_with_its_description(tmp_path):
    tool, mirror, out = _tool(), tmp_path / "mirror", tmp_path / "data"
    rows_of = _all_layouts(mirror)
    assert tool.main(["--source", str(mirror), "--out", str(out)]) == 0
    for name, rows in rows_of.items():
        loaded = load_rows(str(out / f"{name}.parquet"))
        assert len(loaded) == len(rows)
        assert [r["content"] for r in loaded] == [r["content"] for r in rows]
        if name.startswith("dapo"):  # the reference layout is kept; opcd reads the answer from the ground truth
            assert [r["answer"] for r in loaded] == [r["reward_model"]["ground_truth"] for r in rows]
            assert loaded[0]["data_source"] == "math_dapo"
        else:
            assert [r["answer"] for r in loaded] == [r["answer"] for r in rows]
        about = json.loads((out / f"{name}.json").read_text())
        assert about["source"] == str((mirror / name).resolve()) and about["split"] == "train"
        assert about["rows"] == len(rows) and "content" in about["columns"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_limit_and_only(tmp_path):
    tool, mirror, out = _tool(), tmp_path / "mirror", tmp_path / "data"
    _all_layouts(mirror)
    assert tool.main(["--source", str(mirror), "--out", str(out), "--only", "dapo_test", "--limit", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dapo_test.json", "dapo_test.parquet"]
    assert len(load_rows(str(out / "dapo_test.parquet"))) == 2


def test_wrong_layout_is_refused_with_the_missing_column(tmp_path, capsys):
    tool, mirror, out = _tool(), tmp_path / "mirror", tmp_path / "data"
    rows = [{k: v for k, v in row.items() if k != "reward_model"} | {"answer": "2"} for row in _dapo_rows(3)]
    _fixture(mirror, {"dapo_train": rows, "sys_safety_test": [{"content": [{"role": "user", "content": "x"}],
                                                                "answer": 1}]})
    assert tool.main(["--source", str(mirror), "--out", str(out), "--only", "dapo_train", "sys_safety_test"]) == 1
    err = capsys.readouterr().err
    assert "dapo_train:" in err and "missing column(s) reward_model" in err
    assert "sys_safety_test:" in err and "field 'answer' must be a string" in err
    assert list(out.iterdir()) == []


def test_unreachable_source_lists_every_failure_and_exits_1(tmp_path, capsys):
    tool, out = _tool(), tmp_path / "data"
    assert tool.main(["--source", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("prepare_data: failed: ") == 7 and "cannot load" in err
    assert "7 of 7 dataset(s) not written" in err
    assert list(out.iterdir()) == []  # nothing partial left behind
